"""``LitVAE``: a LightningModule wiring encoder, posterior head, prior, decoder, likelihood and
KL regularizer, each built by name from a plain config mapping.

One convention for every number it reports, per sample ``x``::

    recon = −log p(x|z)           summed over data dims        (batch,)
    kl    = KL(q(z|x) ‖ p(z))     summed over latent dims      (batch,)
    loss  = mean_batch(recon + penalty)    penalty = β·kl, free bits, capacity, ...
    elbo  = −mean_batch(recon + kl)        always the true ELBO, in nats per sample

With ``k`` samples per data point (``objective.num_samples``), ``recon`` is the mean over them
and ``loss`` is the objective's (``elbo``, or ``iwae``: the importance-weighted bound).

Validation and test metrics are means over samples, exact across batches and DDP ranks
(:class:`~lit_vae.metrics.PerSampleMean`). Under data parallelism a training step's loss and
logged ``train/*`` values are the means over the *global* batch however it was split between
the processes (:mod:`lit_vae.sharding`), and under mixed precision the posterior, prior, KL and
likelihood run in float32 (:mod:`lit_vae.precision`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.distributions import Distribution

from lit_vae.diagnostics import active_units_from_moments
from lit_vae.guards import (
    NonFiniteLossError,
    all_finite,
    check_nan_policy,
    describe_non_finite,
    non_finite_names,
)
from lit_vae.kl import kl_per_dim
from lit_vae.likelihoods import LIKELIHOODS, Likelihood
from lit_vae.metrics import EpochSums, PerSampleMean
from lit_vae.nets import DECODERS, ENCODERS, Decoder, Encoder
from lit_vae.noise import NoiseKey, check_noise_source, decorrelate_processes, keyed_rsample
from lit_vae.objectives import Objective, build_objective
from lit_vae.optim import build_optimizer, build_scheduler
from lit_vae.posteriors import POSTERIORS, PosteriorHead
from lit_vae.precision import at_least_float32, full_precision
from lit_vae.priors import PRIORS, Prior, VampPrior
from lit_vae.regularizers import REGULARIZERS, Penalty, Regularizer
from lit_vae.sharding import BatchShard, batch_shard

__all__ = ["ElboTerms", "LitVAE"]

EVAL_TERMS = ("loss", "recon", "kl", "elbo")
# The default chunk of ``log_likelihood``: about this many numbers per chunk's decoder output
# (128 MiB in float32). Smaller chunks are slower (``benchmarks/memory.py``), larger ones gain
# little; with an MNIST MLP and 1000 test items per batch a whole test/nll stays under 1 GiB.
CHUNK_ELEMENTS = 2**25


class ElboTerms(NamedTuple):
    """One pass through the model.

    Attributes:
        recon: ``−log p(x|z)`` per sample, ``(batch,)``.
        penalty: the regularizer's output (training penalty, true KL, logs), each ``(batch,)``.
        q: posterior, batch ``(batch,)``, event ``(latent,)``.
        p: prior.
        z: the reparameterized samples, ``(samples, batch, latent)``.
        loss: the objective's loss per sample, ``(batch,)``; the training loss is its mean.
    """

    recon: Tensor
    penalty: Penalty
    q: Distribution
    p: Distribution
    z: Tensor
    loss: Tensor


def _plain(config: Any) -> Any:
    """A plain-container copy of a config (DictConfig, tuples, ...) for hyperparameters."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(config, Mapping):
        return {str(k): _plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain(v) for v in config]
    return config


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


class LitVAE(pl.LightningModule):
    """A variational autoencoder whose every part is chosen by name.

    Args:
        data_shape: shape of one sample, e.g. ``(1, 28, 28)``.
        latent_dim: ``d``, latent dimensions (≥ 1).
        encoder: ``{"name": "mlp", ...}`` from ``ENCODERS`` (or ``_target_``).
        decoder: ``{"name": "mlp", ...}`` from ``DECODERS``.
        posterior: ``{"name": "log_var", ...}`` from ``POSTERIORS``.
        prior: ``{"name": "standard_normal", ...}`` from ``PRIORS``.
        likelihood: ``{"name": "bernoulli", ...}`` from ``LIKELIHOODS``.
        regularizer: ``{"name": "kl", "beta": 1.0}`` from ``REGULARIZERS``.
        objective: ``{"name": "elbo"}`` or ``{"name": "iwae", "num_samples": k}`` from
            ``OBJECTIVES``.
        optimizer: ``{"name": "adam", "lr": 1e-3, ...}``.
        scheduler: ``None`` or ``{"name": ..., "interval": "epoch", ...}``.
        eval_num_samples: importance samples ``k`` for ``test/nll`` (≥ 1).
        eval_chunk_size: samples per chunk in :meth:`log_likelihood`; ``None`` picks one.
        active_unit_threshold: a unit is active when ``Cov_x(E_q[z_u]) >`` this.
        init_output_bias: set the decoder's output bias from the training mean at fit start
            (logit of the mean pixel for Bernoulli, as in Burda et al. 2016).
        reparam_noise: where the noise of ``z ~ q(z|x)`` comes from: ``torch`` (each process's
            generator) or ``keyed`` (drawn per global batch, the same however many processes
            share it; :mod:`lit_vae.noise`).
        noise_seed: the seed of the ``keyed`` noise.
        nan_policy: ``raise`` stops at a non-finite loss or gradient, naming the terms, the step
            and the batch; ``skip`` skips the batch and counts it in ``train/skipped_batches``
            (:mod:`lit_vae.guards`).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int = 2,
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        posterior: Mapping[str, Any] | None = None,
        prior: Mapping[str, Any] | None = None,
        likelihood: Mapping[str, Any] | None = None,
        regularizer: Mapping[str, Any] | None = None,
        objective: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        eval_num_samples: int = 1000,
        eval_chunk_size: int | None = None,
        active_unit_threshold: float = 0.01,
        init_output_bias: bool = True,
        reparam_noise: str = "torch",
        noise_seed: int = 0,
        nan_policy: str = "raise",
    ) -> None:
        super().__init__()
        hparams = _plain(
            {
                "data_shape": list(data_shape),
                "latent_dim": latent_dim,
                "encoder": encoder or {"name": "mlp"},
                "decoder": decoder or {"name": "mlp"},
                "posterior": posterior or {"name": "log_var"},
                "prior": prior or {"name": "standard_normal"},
                "likelihood": likelihood or {"name": "bernoulli"},
                "regularizer": regularizer or {"name": "kl"},
                "objective": objective or {"name": "elbo"},
                "optimizer": optimizer or {"name": "adam", "lr": 1e-3},
                "scheduler": scheduler,
                "eval_num_samples": eval_num_samples,
                "eval_chunk_size": eval_chunk_size,
                "active_unit_threshold": active_unit_threshold,
                "init_output_bias": init_output_bias,
                "reparam_noise": reparam_noise,
                "noise_seed": noise_seed,
                "nan_policy": nan_policy,
            }
        )
        self.save_hyperparameters(hparams)
        self.data_shape = tuple(int(s) for s in hparams["data_shape"])
        self.latent_dim = _check_int("latent_dim", latent_dim, 1)
        _check_int("eval.num_samples", eval_num_samples, 1)
        if eval_chunk_size is not None:
            _check_int("eval.chunk_size", eval_chunk_size, 1)
        self.reparam_noise = check_noise_source(reparam_noise)
        self.noise_seed = _check_int("noise_seed", noise_seed, 0)
        self.nan_policy = check_nan_policy(nan_policy)
        self.skipped_batches = 0

        self.posterior: PosteriorHead = POSTERIORS.from_config(
            hparams["posterior"], "posterior", latent_dim=latent_dim
        )
        self.encoder: Encoder = ENCODERS.from_config(
            hparams["encoder"],
            "model.encoder",
            input_shape=self.data_shape,
            output_dim=self.posterior.num_params,
        )
        self.decoder: Decoder = DECODERS.from_config(
            hparams["decoder"], "model.decoder", latent_dim=latent_dim, output_shape=self.data_shape
        )
        self.likelihood: Likelihood = LIKELIHOODS.from_config(
            hparams["likelihood"], "likelihood", data_shape=self.data_shape
        )
        prior_config = dict(hparams["prior"])
        prior_class = PRIORS.get(prior_config["name"]) if "name" in prior_config else None
        if prior_class is not None and issubclass(prior_class, VampPrior):
            prior_config.setdefault("input_shape", list(self.data_shape))
        self.prior: Prior = PRIORS.from_config(prior_config, "prior", latent_dim=latent_dim)
        if isinstance(self.prior, VampPrior):
            self.prior.bind(self.encode)
        self.regularizer: Regularizer = REGULARIZERS.from_config(
            hparams["regularizer"], "regularizer"
        )
        self.objective: Objective = build_objective(hparams["objective"])
        self._check_combination()

        width = len(EVAL_TERMS)
        self.train_sums = EpochSums()
        self.val_metrics = PerSampleMean(width + latent_dim)
        self.test_metrics = PerSampleMean(width + 1 + latent_dim)

    # ------------------------------------------------------------------ model API

    def encode(self, x: Tensor) -> Distribution:
        """``x (batch, *data_shape)`` → ``q(z|x)``, batch ``(batch,)``, event ``(latent,)``.

        The head runs in float32 (or float64) even under autocast."""
        return self._posterior_of(self._posterior_params(x))

    def _posterior_params(self, x: Tensor) -> Tensor:
        """The encoder's output for ``x``, at least float32: ``(batch, num_params)``."""
        return at_least_float32(self.encoder(x))

    def _posterior_of(self, params: Tensor) -> Distribution:
        with full_precision(params.device):
            return self.posterior(params)

    def decode(self, z: Tensor) -> Distribution:
        """``z (*, latent)`` → ``p(x|z)`` with event shape ``data_shape``."""
        return self.likelihood(self.decoder(z))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``: the mean of ``p(x | z = E_q[z])``, ``(batch, *data_shape)``."""
        return self.reconstruct(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean of ``p(x | z = E_q[z])``, ``(batch, *data_shape)``."""
        return self.likelihood.mean(self.decoder(self.encode(x).mean))

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> Tensor:
        """``num_samples`` draws ``z ~ p(z)`` decoded: ``(num_samples, *data_shape)``.

        Args:
            mean: return the mean of ``p(x|z)`` (what image grids show) instead of a sample.
        """
        z = self.prior().sample((num_samples,))
        params = self.decoder(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params)

    def elbo_terms(self, x: Tensor, noise: NoiseKey | None = None) -> ElboTerms:
        """One reparameterized pass through the model for ``x (batch, *data_shape)``, with
        ``objective.num_samples`` samples ``z`` per data point.

        Args:
            noise: draw ``z`` with the keyed noise of this global batch
                (:func:`~lit_vae.noise.keyed_rsample`); ``None`` uses torch's generator.

        The networks run in the ambient precision (autocast included); the posterior, prior,
        ``z``, likelihood, regularizer and objective in float32 or wider.
        """
        sample_shape = (self.objective.num_samples,)
        if noise is None:
            q = self.encode(x)
            with full_precision(x.device):
                z = q.rsample(sample_shape)
        else:
            params = self._posterior_params(x)
            q = self._posterior_of(params)
            with full_precision(x.device):
                z = keyed_rsample(self.posterior, params, noise, sample_shape)
        p = self.prior()
        recon = self.likelihood.nll(self.decoder(z), x)
        with full_precision(x.device):
            penalty = self.regularizer(q, p, z, self.global_step)
            loss = self.objective(recon, penalty, q, p, z)
        return ElboTerms(recon.mean(0), penalty, q, p, z, loss)

    @torch.no_grad()
    def log_likelihood(
        self,
        x: Tensor,
        num_samples: int = 1000,
        chunk_size: int | None = None,
        noise: NoiseKey | None = None,
    ) -> Tensor:
        """Importance-weighted estimate of ``log p(x)``, ``(batch,)``, in nats.

        ``log (1/k) Σ_i p(x, z_i) / q(z_i|x)`` with ``z_i ~ q(z|x)`` — the IWAE bound of
        Burda et al. (2016), a lower bound that tightens as ``k`` grows. Samples are drawn
        ``chunk_size`` at a time and combined with a running log-sum-exp, so memory stays
        ``O(chunk_size · batch · data)`` for any ``k``. With ``noise``, chunk ``i`` draws the
        keyed noise ``noise.chunk(i)`` of the global batch, and the default chunk size follows
        the global batch, so the estimate does not depend on how the batch was split.
        """
        _check_int("num_samples", num_samples, 1)
        params = self._posterior_params(x) if noise is not None else None
        q = self.encode(x) if params is None else self._posterior_of(params)
        p = self.prior()
        if chunk_size is None:
            rows = x.shape[0] if noise is None else noise.shard.global_size
            per_sample = x[0].numel() + 4 * self.latent_dim
            chunk_size = max(1, min(num_samples, CHUNK_ELEMENTS // max(1, rows * per_sample)))
        dtype = torch.promote_types(q.mean.dtype, torch.float32)  # float64 models stay float64
        total = torch.full(x.shape[:1], -math.inf, dtype=dtype, device=x.device)
        for start in range(0, num_samples, chunk_size):
            shape = (min(chunk_size, num_samples - start),)
            with full_precision(x.device):
                if noise is None or params is None:
                    z = q.sample(shape)
                else:
                    z = keyed_rsample(self.posterior, params, noise.chunk(start), shape)
            recon = self.likelihood.nll(self.decoder(z), x)
            with full_precision(x.device):
                log_weight = -recon.to(dtype) + p.log_prob(z).to(dtype) - q.log_prob(z).to(dtype)
            total = torch.logaddexp(total, torch.logsumexp(log_weight, dim=0))
        return total - math.log(num_samples)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        try:  # the training set size, for regularizers that need it (beta_tc)
            num_train = getattr(datamodule, "num_train", None)
        except ValueError:  # a datamodule without a training split
            num_train = None
        if isinstance(num_train, int):
            self.regularizer.set_dataset_size(num_train)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if stage == "fit" and distributed and self.reparam_noise == "torch":
            decorrelate_processes(self.trainer.global_rank)
        if stage != "fit" or not self.hparams["init_output_bias"]:
            return
        train_mean = getattr(datamodule, "train_mean", None)
        output_bias_for = getattr(self.likelihood, "output_bias_for", None)
        init = getattr(self.decoder, "init_output_bias", None)
        if callable(train_mean) and callable(output_bias_for) and callable(init):
            bias = output_bias_for(train_mean())
            if bias is not None:
                init(bias)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x = batch[0]
        shard = self._shard("train", batch_idx, x.shape[0])
        terms = self.elbo_terms(x, self._noise_key("train", batch_idx, shard))
        # This process's part of the global-batch mean, times the number of processes: DDP
        # averages the gradients, and sync_dist the logged values, over the processes, which
        # gives the global-batch mean however the batch was split.
        world_size = self.trainer.world_size if self._trainer is not None else 1
        scale = world_size / shard.global_size
        loss = terms.loss.sum() * scale
        if self._any_rank_non_finite(loss):
            self._non_finite_loss(terms, loss, batch_idx)
            return None
        # the logged terms stay out of the autograd graph
        recon, kl = terms.recon.detach(), terms.penalty.kl.detach()
        sums = torch.stack([terms.loss.detach(), recon, kl, -(recon + kl)], -1).sum(0)
        values = sums * scale
        self.train_sums.add(sums, shard.global_size)
        if self._loggers_write_this_step():
            self.log_dict(
                {f"train/{name}_step": value for name, value in zip(EVAL_TERMS, values)},
                sync_dist=True,
                batch_size=shard.global_size,
            )
            for name, value in terms.penalty.logs.items():
                self.log(f"train/{name}", value, batch_size=x.shape[0])
            self._log_skipped(x.shape[0])
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Whether the loggers write step values now (every ``trainer.log_every_n_steps``).

        Step values are logged only then: ``self.log`` costs more than a small model's step.
        """
        if self._trainer is None:
            return False
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_epoch_start(self) -> None:
        # keeps the sums of a checkpoint written in the middle of this epoch
        if self.train_sums.epoch != self.current_epoch:
            self.train_sums.reset(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """``train/{loss,recon,kl,elbo}_epoch``: means over every sample of the epoch (one
        all-reduce)."""
        means = self.train_sums.means(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if means is not None:
            # already reduced over the processes: sync_dist averages identical values
            self.log_dict(
                {f"train/{name}_epoch": mean.float() for name, mean in zip(EVAL_TERMS, means)},
                sync_dist=True,
            )

    # ------------------------------------------------------------------ numerical guards

    def _any_rank_non_finite(self, loss: Tensor) -> bool:
        """Whether the loss is NaN or infinite on this process or any other (one sync)."""
        non_finite = not bool(torch.isfinite(loss))
        if self._trainer is None:
            return non_finite
        return bool(self.trainer.strategy.reduce_boolean_decision(non_finite, all=False))

    def _where(self, batch_idx: int) -> str:
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return f"global step {self.global_step} (epoch {epoch}, batch {batch_idx})"

    def _non_finite_loss(self, terms: ElboTerms, loss: Tensor, batch_idx: int) -> None:
        """Raise :class:`NonFiniteLossError` or count the skipped batch, per ``nan_policy``."""
        if self.nan_policy == "skip":
            self.skipped_batches += 1
            self._log_skipped(terms.recon.shape[0])
            return
        name = REGULARIZERS.name_of(self.regularizer) or type(self.regularizer).__name__
        penalty = terms.penalty
        described = describe_non_finite(
            {"recon": terms.recon, "kl": penalty.kl, f"penalty ({name})": penalty.penalty}
        )
        if not described:
            described = (
                f"loss ({float(loss)}: every per-sample term is finite, their batch mean is not)"
                if not bool(torch.isfinite(loss))
                else "loss (finite here, non-finite on another process)"
            )
        raise NonFiniteLossError(
            f"non-finite training loss at {self._where(batch_idx)}: {described}; "
            "stopped before the optimizer step, no checkpoint was written over the last good one "
            "(nan_policy=skip skips such batches)"
        )

    def _log_skipped(self, batch_size: int) -> None:
        if self.nan_policy == "skip":
            self.log(
                "train/skipped_batches",
                float(self.skipped_batches),
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop (``raise``) or drop the update (``skip``) when a gradient is NaN or infinite.

        Skipped under a gradient scaler (``16-mixed``), which skips such steps itself.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        if all_finite(grads):
            return
        bad = non_finite_names((n, p.grad) for n, p in self.named_parameters())
        if self.nan_policy == "skip":
            self.skipped_batches += 1
            for parameter in self.parameters():
                parameter.grad = None
            return
        batch_idx = self.trainer.fit_loop.epoch_loop.batch_idx
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteLossError(
            f"non-finite gradient at {self._where(batch_idx)} with a finite loss: {shown}; "
            "stopped before the optimizer step, no checkpoint was written over the last good one "
            "(nan_policy=skip skips such batches)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_batches"] = self.skipped_batches
        checkpoint["train_epoch_sums"] = self.train_sums.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = int(checkpoint.get("skipped_batches", 0))
        self.train_sums.load_state_dict(checkpoint.get("train_epoch_sums", {}), self.device)

    def _shard(self, stage: str, batch_idx: int, size: int) -> BatchShard:
        """Where this batch sits in its global batch (:func:`~lit_vae.sharding.batch_shard`)."""
        if self._trainer is None:
            return BatchShard(0, size, size)
        return batch_shard(self.trainer, stage, batch_idx, size)

    def _noise_key(self, stage: str, batch_idx: int, shard: BatchShard) -> NoiseKey | None:
        if self.reparam_noise != "keyed":
            return None
        epoch = self.current_epoch if stage != "test" else 0
        return NoiseKey.of(self.noise_seed, stage, epoch, batch_idx, shard)

    def _eval_values(
        self, x: Tensor, noise: NoiseKey | None = None
    ) -> tuple[Tensor, Distribution, Distribution]:
        """Per-sample ``[loss, recon, kl, elbo]`` as ``(batch, 4)``, with ``q`` and ``p``."""
        terms = self.elbo_terms(x, noise)
        recon, kl = terms.recon, terms.penalty.kl
        per_sample = torch.stack([terms.loss, recon, kl, -(recon + kl)], dim=-1)
        return per_sample, terms.q, terms.p

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        noise = self._noise_key("val", batch_idx, self._shard("val", batch_idx, x.shape[0]))
        per_sample, q, p = self._eval_values(x, noise)
        per_dim = self._kl_per_dim(q, p, per_sample.shape[0])
        self.val_metrics.update(torch.cat([per_sample, per_dim], dim=-1))

    def on_validation_epoch_end(self) -> None:
        mean, _ = self.val_metrics.compute()
        self.val_metrics.reset()
        logs = {f"val/{name}": mean[i] for i, name in enumerate(EVAL_TERMS)}
        if self.posterior.factorized and self.prior.factorized:
            offset = len(EVAL_TERMS)
            logs.update({f"kl_dim/{j}": mean[offset + j] for j in range(self.latent_dim)})
        elbo = logs.pop("val/elbo")
        # already reduced over the processes: sync_dist averages identical values
        self.log("val/elbo", elbo.float(), prog_bar=True, sync_dist=True)
        self.log_dict({k: v.float() for k, v in logs.items()}, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        noise = self._noise_key("test", batch_idx, self._shard("test", batch_idx, x.shape[0]))
        per_sample, q, _ = self._eval_values(x, noise)
        nll = -self.log_likelihood(
            x, self.hparams["eval_num_samples"], self.hparams["eval_chunk_size"], noise
        )
        self.test_metrics.update(torch.cat([per_sample, nll.unsqueeze(-1), q.mean], dim=-1))

    def on_test_epoch_end(self) -> None:
        mean, mean_squares = self.test_metrics.compute()
        self.test_metrics.reset()
        logs = {f"test/{name}": mean[i] for i, name in enumerate(EVAL_TERMS)}
        offset = len(EVAL_TERMS)
        logs["test/nll"] = mean[offset]
        active = active_units_from_moments(
            mean[offset + 1 :], mean_squares[offset + 1 :], self.hparams["active_unit_threshold"]
        )
        logs["test/active_units"] = active.sum().to(mean.dtype)
        self.log_dict({k: v.float() for k, v in logs.items()}, sync_dist=True)

    def _check_combination(self) -> None:
        """Regularizer, objective, head and prior that cannot work together raise here."""
        config = self.hparams["regularizer"]
        regularizer = config.get("name") or config.get("_target_")
        if self.regularizer.requires_factorized and not (
            self.posterior.factorized and self.prior.factorized
        ):
            raise ValueError(
                f"regularizer.name={regularizer}: needs the KL per latent dim, which is "
                f"undefined for posterior.name={self.hparams['posterior'].get('name')} with "
                f"prior.name={self.hparams['prior'].get('name')}; use a diagonal head (log_var, "
                "log_std, std, var) with a standard_normal or learned_diagonal prior"
            )
        if not self.objective.uses_penalty and not self.regularizer.is_elbo():
            raise ValueError(
                f"objective.name={self.hparams['objective'].get('name')}: the bound has no "
                f"separate KL term, so it needs regularizer=kl with beta=1 and the constant "
                f"schedule (got regularizer.name={regularizer})"
            )

    def _kl_per_dim(self, q: Distribution, p: Distribution, batch: int) -> Tensor:
        if self.posterior.factorized and self.prior.factorized:
            return kl_per_dim(q, p).detach()
        return q.mean.new_zeros(batch, self.latent_dim)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.parameters(), self.hparams["optimizer"])
        scheduler = build_scheduler(optimizer, self.hparams["scheduler"])
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
