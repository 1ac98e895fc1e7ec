"""Long prompt/response records for throughput runs of the training CLI at real lengths.

Cuts the Python sources of the standard library (present on any machine, no download) into
{"input", "output"} records of about --prompt_chars and --response_chars characters. The text is
real code, so tokenizers give realistic lengths; no model wrote it, so use it for speed only.

    python benchmarks/long_data.py --out /tmp/long.jsonl --records 64 --prompt_chars 1600 --response_chars 30000
"""

import argparse
import json
import sysconfig
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--prompt_chars", type=int, default=1600)
    ap.add_argument("--response_chars", type=int, default=30000)
    ap.add_argument("--src", default=sysconfig.get_paths()["stdlib"])
    args = ap.parse_args()
    text = "".join(p.read_text(errors="replace") for p in sorted(Path(args.src).glob("*.py")))
    size = args.prompt_chars + args.response_chars
    if len(text) < size * args.records:
        raise SystemExit(f"{args.src}: {len(text)} characters of source, {size * args.records} needed")
    tmp = Path(args.out + ".tmp")
    with open(tmp, "w") as f:
        for i in range(args.records):
            piece = text[i * size:(i + 1) * size]
            f.write(json.dumps({"id": f"long-{i}", "input": "Continue this code:\n" + piece[:args.prompt_chars],
                                "output": piece[args.prompt_chars:]}) + "\n")
    tmp.rename(args.out)
    print(f"{args.out}: {args.records} records of {args.prompt_chars} + {args.response_chars} characters")


if __name__ == "__main__":
    main()
