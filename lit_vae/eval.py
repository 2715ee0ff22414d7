"""``lit-vae-eval``: evaluate a checkpoint, or decode prior samples into a PNG grid.

lit-vae-eval ckpt_path=outputs/runs/.../checkpoints/last.ckpt eval.num_samples=5000
lit-vae-eval ckpt_path=... mode=sample n=64
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from lit_vae.build import build_datamodule, build_loggers, build_trainer
from lit_vae.checkpoints import load_checkpoint, model_from_checkpoint
from lit_vae.images import save_grid
from lit_vae.tracking import describe_run
from lit_vae.validation import EVAL_MODES, config_errors, validate_eval_config

log = logging.getLogger(__name__)

__all__ = ["evaluate", "main"]

MODES = EVAL_MODES


def evaluate(cfg: DictConfig) -> dict[str, float] | Path:
    """Run ``cfg.mode`` on ``cfg.ckpt_path``: the metrics dict (test) or the PNG path (sample)."""
    validate_eval_config(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("seed %d", cfg.seed)
    ckpt_path = Path(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    with config_errors("ckpt_path"):
        model = model_from_checkpoint(checkpoint)
    model.eval()

    if cfg.mode == "sample":
        output = Path(cfg.output) if cfg.output else ckpt_path.parent / f"samples-{cfg.n}.png"
        path = save_grid(model.sample(int(cfg.n)), output, scale=4)
        log.info("wrote %s", path)
        print(f"samples: {path}")
        return path

    model.hparams["eval_num_samples"] = int(cfg.eval.num_samples)
    model.hparams["eval_chunk_size"] = cfg.eval.get("chunk_size")
    stored = checkpoint.get("datamodule_hyper_parameters")
    if not stored:
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} records no data config; it was not written by "
            "lit-vae-train"
        )
    data_config = OmegaConf.merge(OmegaConf.create(dict(stored)), cfg.get("data") or {})
    assert isinstance(data_config, DictConfig)
    with config_errors("data"):
        datamodule = build_datamodule(data_config)
    with config_errors("logger"):
        loggers = build_loggers(cfg.get("logger"))
    describe_run(loggers, cfg)
    with config_errors("trainer"):
        trainer = build_trainer(cfg.trainer, callbacks=[], loggers=loggers)
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {
        key: float(value)
        for key, value in sorted(trainer.callback_metrics.items())
        if key.startswith("test/")
    }
    if trainer.is_global_zero:
        output = Path(cfg.output) if cfg.output else ckpt_path.parent / "eval.json"
        output.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"eval: {output}")
    return metrics


def main() -> None:
    """``python -m lit_vae.eval``: the same as ``lit-vae-eval`` (:mod:`lit_vae.cli`)."""
    from lit_vae.cli import eval_main

    eval_main()


if __name__ == "__main__":
    main()
