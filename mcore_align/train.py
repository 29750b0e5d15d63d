"""Entry point: ``torchrun ... -m mcore_align.train --config run.yaml [key=value ...]``."""
from __future__ import annotations

import argparse
import logging
import sys

from mcore_align.parallel.quiet import quiet_library_warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Preference alignment on Megatron-Core (DPO, KTO, CPO, ORPO, SimPO, RM, SFT)")
    p.add_argument("--config", help="YAML file with sections model/data/parallel/optim/train/algo")
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value (e.g. beta=0.2 train.save=/ckpt)")
    a = p.parse_args(argv)
    quiet_library_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    from mcore_align.config import load_config
    from mcore_align.parallel.runtime import destroy
    from mcore_align.trainer.trainer import Trainer

    cfg = load_config(a.config, a.overrides)
    trainer = Trainer(cfg)
    result = trainer.train()
    if trainer.rt.rank == 0:
        h = result["history"]
        if h:
            print(f"done: step {result['step']}, first loss {h[0].get('loss'):.4f}, last loss {h[-1].get('loss'):.4f}"
                  + (f", plot {result.get('plot')}" if result.get("plot") else ""))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
