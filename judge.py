#!/usr/bin/env python
"""Judge answers for faithfulness to a document (see lynx/judge_cli.py, or `python judge.py --help`).

    python judge.py --model DIR --question Q --context DOC --answer A
    python judge.py --model DIR --input rows.jsonl --output judged.jsonl --eval
    torchrun --nproc_per_node 8 judge.py --model DIR --input halubench.jsonl --eval
"""

import sys

from lynx.judge_cli import main

if __name__ == "__main__":
    sys.exit(main())
