"""The causal preset's base test loss with each end-of-sequence token an answer can end with (docs/benchmarks.md).

    python benchmarks/eos_token.py --out benchmarks/results/eos_token

transformers 5.17 reads the embedded SmolLM2's GGUF tokenizer with `<|im_start|>` as its eos token, where the file
(and transformers 5.24) says `<|im_end|>`. The causal collator ends every answer with the eos token, which is a
label, so the two readings score different sequences. This measures the base model's loss on the preset's test
problems (GSM8K, as `alignment.py` measures it) with each token as eos, on one machine: a gap here is the token's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as cv  # noqa: E402
from common import device_info, pick_device, write_json  # noqa: E402

TOKENS = ("<|im_end|>", "<|im_start|>")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gsm8k", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"))
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = cv.PRESETS["causal"]
    device, dtype = pick_device("auto", "float32")
    a = argparse.Namespace(gsm8k=args.gsm8k)
    task, model, tok, collate = cv.load_everything(p, a, device, dtype)
    rows = {}
    for token in TOKENS:
        tok.eos_token = token  # the collator's own tokenizer: its answers now end with this token
        assert collate.tokenizer is tok
        rows[token] = {"eos_token_id": tok.eos_token_id,
                       "test_loss": cv.heldout(model, task.test[: p.n_heldout], collate, device)["loss"]}
        print(f"eos {token} (id {tok.eos_token_id}): base test loss {rows[token]['test_loss']:.6f}")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "eos_token.json"), {"n_test": p.n_heldout, "losses": rows,
                                                          "device": device_info()})


if __name__ == "__main__":
    main()
