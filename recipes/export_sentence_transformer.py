"""Write a trained product encoder as a plain sentence-transformers model (``afmrl.encoder.st_export``).

    python recipes/export_sentence_transformer.py --encoder outputs/agcl-demo --output_dir outputs/agcl-demo-st

Then, with no package code: ``SentenceTransformer("outputs/agcl-demo-st").encode({"image": photo, "text": title})``
equals ``ProductEncoder.encode`` of the listing. An encoder that sentence-transformers cannot reproduce (modality
experts, the package's own photo downscaling, a backbone without Qwen2-VL's chat markers) is one ``error:`` line.
"""

import sys
from dataclasses import dataclass, field

from afmrl.cli import run_cli
from afmrl.encoder.model import load_frozen_encoder, read_encoder_config


@dataclass
class ExportArguments:
    encoder: str = field(metadata={"help": "A saved product encoder (recipes/agcl_train.py's output_dir)."})
    output_dir: str = field(metadata={"help": "Where the sentence-transformers model goes."})


def main(args: ExportArguments):
    read_encoder_config(args.encoder)  # not a product encoder -> one clear line, before any weights load
    path = load_frozen_encoder(args.encoder, device="cpu").save_sentence_transformer(args.output_dir)
    print(f"[export] wrote {path}: SentenceTransformer({str(path)!r}) loads it", file=sys.stderr)
    return path


def cli(argv=None):
    return run_cli(ExportArguments, main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
