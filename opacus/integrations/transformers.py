"""DP-SGD under Hugging Face ``transformers.Trainer``: ``DPTrainer``.

``DPTrainer`` is a ``transformers.Trainer`` whose training steps are this library's DP-SGD:

- **Sampling.** The training data loader draws Poisson batches (each example, or each *user*
  with ``user_ids``, joins a logical batch with probability ``q``). The expected logical batch
  is ``per_device_train_batch_size * gradient_accumulation_steps`` examples (users), so
  ``q = that / len(train_dataset)`` (``/ number of users``) and an epoch is ``int(1 / q)`` logical
  batches.
- **Virtual batches.** Each logical batch is split into exactly ``gradient_accumulation_steps``
  micro-batches (balanced; the empty ones, if any, first). The optimizer clips and accumulates
  every micro-batch (``signal_skip_step``, as ``BatchMemoryManager`` does) and adds noise once,
  at the last one: one privacy step, one accountant entry, per logical batch (per Trainer
  ``global_step``).
- **Per-sample losses.** Each example's loss is computed from that example alone
  (``per_sample_loss``): the models' own batch losses (a token mean over the whole batch, or
  ``num_items_in_batch`` across micro-batches) would make one example's gradient depend on the
  others and break the sensitivity bound.
- **Clipping.** ``grad_sample_mode="hooks"`` (per-sample gradients; ``clipping="flat"`` or
  ``"per_layer"``), ``"ghost"`` (ghost clipping with the DP loss's double backward), or
  user-level clipping (``user_ids``: each user's summed gradient is clipped,
  ``opacus.optimizers.user_level``). The hooks are installed without wrapping
  (``wrap_model=False``): the model keeps its class (``PreTrainedModel``, ``PeftModel``).
  Frozen parameters (PEFT adapters: all but the adapter weights) get no per-sample gradient.
- **Privacy report.** ``epsilon`` and ``delta`` join the Trainer's logged metrics; the accountant
  is saved with every checkpoint (``dp_accountant.pt``) and restored when training resumes, so a
  resumed run reports the same epsilon as an uninterrupted one.

Settings that would void the guarantee are refused with a ``ValueError`` naming the argument: the
Trainer's own ``max_grad_norm`` (it clips the *batch* gradient; use
``PrivacyArguments.per_sample_max_grad_norm``), ``fp16`` (loss scaling changes the per-sample
gradients before clipping), ``compute_loss_func`` (a batch-level loss), multi-process or
multi-GPU training, iterable datasets (no Poisson sampling without a length), and a training data
loader that is not this class's Poisson loader. The Trainer's gradient-norm metric is not logged
(it is the norm of a non-private gradient).
"""

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader.samplers import UniformWithReplacementSampler
from opacus.grad_sample.ghost_loss import DPTensorFastGradientClipping
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.user_level import DPUserLevelOptimizer
from opacus.privacy_engine import PrivacyEngine
from opacus.utils.user_sampler import UserPoissonSampler

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "opacus.integrations.transformers needs the `transformers` package: "
        'pip install "opacus[transformers]"'
    ) from e

__all__ = [
    "ACCOUNTANT_FILE",
    "DPTrainer",
    "PoissonMicroBatchSampler",
    "PrivacyArguments",
    "causal_lm_per_sample_loss",
    "classification_per_sample_loss",
]

#: File holding the accountant's state in every checkpoint folder.
ACCOUNTANT_FILE = "dp_accountant.pt"

_INDEX_KEY = "_dp_sample_indices"
_IGNORE_INDEX = -100


@dataclass
class PrivacyArguments:
    """DP-SGD settings of a ``DPTrainer``.

    Args:
        per_sample_max_grad_norm: ``C``, the bound each example's (each user's) gradient norm is
            clipped to. (The Trainer's ``TrainingArguments.max_grad_norm`` must be 0.) With
            ``clipping="per_layer"``: a list with one bound per trainable parameter, or one
            float ``C`` split evenly, ``C / sqrt(K)`` for each of the ``K`` parameters.
        noise_multiplier: ``sigma``; or leave None and give ``target_epsilon``.
        target_epsilon: calibrate ``sigma`` so that the whole run (``max_steps``, or the epochs)
            spends at most this epsilon at ``target_delta``.
        target_delta: the delta of the reported (and targeted) epsilon.
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"``.
        grad_sample_mode: ``"hooks"`` or ``"ghost"``.
        clipping: ``"flat"`` or ``"per_layer"`` (hooks mode only).
        loss_reduction: how per-sample losses make up the batch loss, ``"mean"`` (the noisy sum
            is divided by the expected batch size) or ``"sum"``.
        secure_mode: CSPRNG noise and a CSPRNG-seeded sampler (``PrivacyEngine``).
    """

    per_sample_max_grad_norm: Union[float, List[float]] = 1.0
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    target_delta: float = 1e-5
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    clipping: str = "flat"
    loss_reduction: str = "mean"
    secure_mode: bool = False

    def __post_init__(self):
        owner = "PrivacyArguments"
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"{owner}: give exactly one of noise_multiplier and target_epsilon (got "
                f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})"
            )
        if not (0 < self.target_delta < 1):
            raise ValueError(f"{owner}: target_delta must be in (0, 1), got {self.target_delta}")
        if self.grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(
                f"{owner}: grad_sample_mode must be 'hooks' or 'ghost', got "
                f"{self.grad_sample_mode!r}"
            )
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"{owner}: loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}"
            )


# ---------------------------------------------------------------------------- per-sample losses
def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: each sequence's mean next-token cross-entropy over its labelled tokens.

    ``labels`` are the inputs (shifted here, as Hugging Face causal LMs do); tokens labelled
    ``-100`` are ignored. A sequence without any labelled token has loss 0.
    """
    logits = logits[:, :-1, :]
    labels = labels[:, 1:].to(logits.device)
    return _token_mean(logits, labels)


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    tokens = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=_IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    valid = (labels != _IGNORE_INDEX).to(tokens.dtype)
    count = valid.sum(dim=1)
    return (tokens * valid).sum(dim=1) / count.clamp(min=1)


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: cross-entropy per example (``(B, C)`` logits), per-token mean for token
    classification (``(B, T, C)``), squared error for regression (one output, float labels)."""
    labels = labels.to(logits.device)
    if logits.dim() == 3:
        return _token_mean(logits, labels)
    if logits.dim() == 2 and logits.shape[1] == 1 and labels.is_floating_point():
        return (logits.view(-1) - labels.view(-1).to(logits.dtype)) ** 2
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    raise ValueError(
        f"classification_per_sample_loss: cannot tell the loss for logits of shape "
        f"{tuple(logits.shape)} and labels of shape {tuple(labels.shape)}: pass "
        "DPTrainer(per_sample_loss=fn) with fn(outputs, labels) -> (batch,) losses"
    )


def _is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForCausalLM") or type(base).__name__.endswith(
        "LMHeadModel"
    )


def _logits_of(outputs) -> torch.Tensor:
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _forward_parameters(model: nn.Module) -> set:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _with_batched_positions(model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """Give ``position_ids`` (and ``use_cache=False``) explicitly, batch on dim 0.

    Left alone, Hugging Face models build ``position_ids`` of shape ``(1, T)`` and broadcast it:
    the position embedding then sees a batch of 1 and no per-sample gradient can be formed for
    it. ``arange(T)`` per row is what the models use by default without a cache.
    """
    accepted = _forward_parameters(model)
    ids = inputs.get("input_ids")
    out = dict(inputs)
    if "position_ids" in accepted and "position_ids" not in inputs and torch.is_tensor(ids):
        batch, length = ids.shape[0], ids.shape[1]
        out["position_ids"] = torch.arange(length, device=ids.device).expand(batch, length)
    if "use_cache" in accepted and "use_cache" not in inputs:
        out["use_cache"] = False
    return out


# ---------------------------------------------------------------------------- data
class _IndexedDataset(Dataset):
    """``(index, dataset[index])``: the collator learns which examples a micro-batch holds."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]


class _IndexedCollator:
    """Collates the examples with the user's collator and records their dataset indices under
    ``_dp_sample_indices``; an empty micro-batch becomes ``{_dp_sample_indices: []}`` without
    calling the collator (which usually cannot collate nothing)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, items):
        indices = torch.tensor([i for i, _ in items], dtype=torch.long)
        if len(items) == 0:
            return {_INDEX_KEY: indices}
        batch = self.collate_fn([x for _, x in items])
        if not isinstance(batch, Mapping):
            raise TypeError(
                "DPTrainer: the data collator must return a mapping (a dict of model inputs, "
                f"as Hugging Face collators do), got {type(batch).__name__}"
            )
        batch = dict(batch)
        batch[_INDEX_KEY] = indices
        return batch


def _balanced_sizes(n: int, parts: int) -> List[int]:
    # Smallest parts first: the last micro-batch (the real step) is empty only if all are.
    base, extra = divmod(n, parts)
    return [base] * (parts - extra) + [base + 1] * extra


class PoissonMicroBatchSampler(Sampler[List[int]]):
    """Splits each logical (Poisson) batch of ``sampler`` into ``num_micro_batches`` lists.

    ``sampler`` is ``UniformWithReplacementSampler`` (examples) or ``UserPoissonSampler`` (users;
    a user's examples stay in one micro-batch, so that user-level clipping sees each user whole).
    ``set_epoch(epoch)`` reseeds the generator with ``seed + epoch`` (when a seed was given), so
    that a run resumed from a checkpoint draws the same batches as an uninterrupted one.
    """

    def __init__(self, sampler: Sampler, num_micro_batches: int, seed: Optional[int] = None):
        if not isinstance(sampler, (UniformWithReplacementSampler, UserPoissonSampler)):
            raise TypeError(
                "PoissonMicroBatchSampler: sampler must be a UniformWithReplacementSampler or a "
                f"UserPoissonSampler, got {type(sampler).__name__}"
            )
        self.sampler = sampler
        self.num_micro_batches = int(num_micro_batches)
        self.seed = seed

    @property
    def sample_rate(self) -> float:
        """The Poisson rate of the logical batches (examples or users): what is accounted."""
        return self.sampler.sample_rate

    def set_epoch(self, epoch: int) -> None:
        """Reseed the generator with ``seed + epoch`` (no-op without a seed: secure mode)."""
        if self.seed is not None and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed + int(epoch))

    def __len__(self) -> int:
        return len(self.sampler) * self.num_micro_batches

    def _split_examples(self, batch: List[int]) -> List[List[int]]:
        chunks, start = [], 0
        for size in _balanced_sizes(len(batch), self.num_micro_batches):
            chunks.append(batch[start : start + size])
            start += size
        return chunks

    def __iter__(self):
        if isinstance(self.sampler, UserPoissonSampler):
            for _ in range(len(self.sampler)):
                users = self.sampler.sample_users()
                start = 0
                for size in _balanced_sizes(len(users), self.num_micro_batches):
                    yield self.sampler.examples_of(users[start : start + size])
                    start += size
        else:
            for batch in self.sampler:
                yield from self._split_examples(list(batch))


class _PoissonDataLoader(DataLoader):
    """The training loader of ``DPTrainer`` (recognised by the checks before training)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------- the trainer
class DPTrainer(Trainer):
    """``transformers.Trainer`` training with DP-SGD (module docstring).

    Args (besides the ``Trainer``'s own):
        privacy_args: ``PrivacyArguments`` (clip bound, noise or target epsilon, delta, ...).
        user_ids: optional, the user of every example of ``train_dataset`` (``user_ids[i]``):
            switches to user-level DP (users Poisson-sampled, each user's summed gradient
            clipped, epsilon about users). ``per_device_train_batch_size *
            gradient_accumulation_steps`` is then the expected number of *users* per step.
        per_sample_loss: optional ``fn(outputs, labels) -> (batch,)``, each example's loss from
            the model outputs; by default next-token cross-entropy for causal LMs and
            ``classification_per_sample_loss`` otherwise.

    After ``train()``: ``privacy_engine`` (its accountant), ``get_epsilon()``, ``dp_optimizer``.
    """

    def __init__(
        self,
        *args,
        privacy_args: Optional[PrivacyArguments] = None,
        user_ids: Optional[Sequence] = None,
        per_sample_loss: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
        **kwargs,
    ):
        if privacy_args is None:
            raise ValueError(
                "DPTrainer: privacy_args is required, e.g. PrivacyArguments("
                "per_sample_max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1e-5)"
            )
        if not isinstance(privacy_args, PrivacyArguments):
            raise TypeError(
                f"DPTrainer: privacy_args must be a PrivacyArguments, got "
                f"{type(privacy_args).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.privacy_args = privacy_args
        if torch.is_tensor(user_ids):
            user_ids = user_ids.tolist()  # ids by value (tensor elements hash by identity)
        self.user_ids = None if user_ids is None else list(user_ids)
        self.per_sample_loss = per_sample_loss
        self.privacy_engine: Optional[PrivacyEngine] = None
        self.dp_optimizer: Optional[DPOptimizer] = None
        self._dp_hooks = None
        self._sampler: Optional[PoissonMicroBatchSampler] = None
        self._check_guarantee_settings()

    # ------------------------------------------------------------------ refusals
    def _check_guarantee_settings(self) -> None:
        args = self.args
        if args.max_grad_norm not in (None, 0, 0.0):
            raise ValueError(
                f"DPTrainer: TrainingArguments.max_grad_norm={args.max_grad_norm} would clip the "
                "batch gradient, which is not DP clipping (and would make the Trainer log the "
                "norm of a non-private gradient): set TrainingArguments(max_grad_norm=0) and the "
                "per-sample bound in PrivacyArguments(per_sample_max_grad_norm=...)"
            )
        if args.fp16:
            raise ValueError(
                "DPTrainer: fp16=True scales the loss (GradScaler), so the per-sample gradients "
                "are clipped at the wrong scale: train in float32 or with bf16=True"
            )
        if args.world_size > 1 or args.n_gpu > 1:
            raise ValueError(
                f"DPTrainer: world_size={args.world_size}, n_gpu={args.n_gpu}: only one process "
                "on one device is supported (each rank would sample and noise on its own); use "
                "PrivacyEngine with DPDDP for data-parallel training"
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("DPTrainer: DeepSpeed and FSDP are not supported; train on one device")
        self._check_loss_and_data_settings()

    def _check_loss_and_data_settings(self) -> None:
        args, pa = self.args, self.privacy_args
        if self.compute_loss_func is not None:
            raise ValueError(
                "DPTrainer: compute_loss_func computes a batch-level loss (mixing the examples "
                "of a micro-batch, or all micro-batches through num_items_in_batch), which "
                "breaks the per-sample sensitivity: pass per_sample_loss=fn with "
                "fn(outputs, labels) -> (batch,) losses instead"
            )
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy != "random" or getattr(args, "group_by_length", False):
            raise ValueError(
                f"DPTrainer: TrainingArguments.train_sampling_strategy={strategy!r} is not "
                "Poisson sampling, which DP-SGD's accounting assumes (DPTrainer samples the "
                "batches itself): leave it at 'random'"
            )
        if self.train_dataset is not None and isinstance(self.train_dataset, IterableDataset):
            raise ValueError(
                "DPTrainer: an IterableDataset has no length, so examples cannot be Poisson "
                "sampled: use a map-style dataset (e.g. datasets.Dataset or a list)"
            )
        if self.user_ids is not None:
            if pa.grad_sample_mode != "hooks" or pa.clipping != "flat":
                raise ValueError(
                    "DPTrainer: user-level DP (user_ids) clips each user's summed per-sample "
                    "gradients: it needs grad_sample_mode='hooks' and clipping='flat', got "
                    f"{pa.grad_sample_mode!r} / {pa.clipping!r}"
                )
            if self.train_dataset is not None and len(self.user_ids) != len(self.train_dataset):
                raise ValueError(
                    f"DPTrainer: user_ids has {len(self.user_ids)} entries but train_dataset "
                    f"has {len(self.train_dataset)} examples: give one user id per example"
                )
        if pa.grad_sample_mode == "ghost" and pa.clipping != "flat":
            raise ValueError("DPTrainer: ghost clipping supports clipping='flat' only")

    # ------------------------------------------------------------------ data
    @property
    def _logical_batch_size(self) -> int:
        return self._train_batch_size * self.args.gradient_accumulation_steps

    def _make_logical_sampler(self, num_samples: int) -> Sampler:
        generator = None
        if not self.privacy_args.secure_mode:
            generator = torch.Generator().manual_seed(self.args.seed)
        else:
            from opacus.optimizers.noise import secure_generator

            generator = secure_generator("cpu")
        if self.user_ids is not None:
            num_users = len(set(self.user_ids))
            rate = min(1.0, self._logical_batch_size / num_users)
            return UserPoissonSampler(user_ids=self.user_ids, sample_rate=rate, generator=generator)
        rate = min(1.0, self._logical_batch_size / num_samples)
        return UniformWithReplacementSampler(
            num_samples=num_samples, sample_rate=rate, generator=generator
        )

    def get_train_dataloader(self) -> DataLoader:
        """A loader of Poisson logical batches, each split into ``gradient_accumulation_steps``
        micro-batches (dicts with ``_dp_sample_indices``, the examples' dataset indices)."""
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        dataset = self.train_dataset
        collator = self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        logical = self._make_logical_sampler(len(dataset))
        seed = None if self.privacy_args.secure_mode else self.args.seed
        self._sampler = PoissonMicroBatchSampler(
            logical, self.args.gradient_accumulation_steps, seed=seed
        )
        return _PoissonDataLoader(
            _IndexedDataset(dataset),
            batch_sampler=self._sampler,
            collate_fn=_IndexedCollator(collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The next ``num_batches`` micro-batches, and no ``num_items_in_batch``: a token count
        across micro-batches would couple the examples' losses (the per-sample losses never
        use it)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return batches, None

    # ------------------------------------------------------------------ the private optimizer
    def _total_steps(self) -> int:
        steps = getattr(self.state, "max_steps", 0) or 0
        if steps <= 0:
            raise ValueError(
                "DPTrainer: cannot calibrate target_epsilon without the number of steps: set "
                "TrainingArguments.max_steps or num_train_epochs"
            )
        return int(steps)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, made private (hooks installed on the model, unwrapped)."""
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, DPOptimizer):
            return optimizer
        self.optimizer = self._make_private(optimizer)
        return self.optimizer

    def _make_private(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        pa = self.privacy_args
        sampler = self._sampler
        if sampler is None:
            raise ValueError(
                "DPTrainer: the optimizer is created before the training data loader; call "
                "train() (DPTrainer builds its Poisson loader there)"
            )
        rate = sampler.sample_rate
        noise = pa.noise_multiplier
        if noise is None:
            noise = get_noise_multiplier(
                target_epsilon=pa.target_epsilon,
                target_delta=pa.target_delta,
                sample_rate=rate,
                steps=self._total_steps(),
                accountant=pa.accountant,
            )
        max_grad_norm = pa.per_sample_max_grad_norm
        if pa.clipping == "per_layer" and not isinstance(max_grad_norm, (list, tuple)):
            # One budget split evenly: the concatenated bound stays C (sqrt(K * (C^2 / K))).
            count = sum(len(g["params"]) for g in optimizer.param_groups)
            max_grad_norm = [max_grad_norm / math.sqrt(count)] * count
        engine = PrivacyEngine(accountant=pa.accountant, secure_mode=pa.secure_mode)
        loader = DataLoader(_IndexedDataset(self.train_dataset), batch_sampler=sampler.sampler)
        module = self.model if self._dp_hooks is None else self._dp_hooks
        result = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=max_grad_norm,
            loss_reduction=pa.loss_reduction,
            poisson_sampling=False,
            clipping=pa.clipping,
            grad_sample_mode=pa.grad_sample_mode,
            wrap_model=False,
        )
        hooks, dp_optimizer = result[0], result[1]
        if self.user_ids is not None:
            dp_optimizer = DPUserLevelOptimizer(
                optimizer,
                noise_multiplier=noise,
                max_grad_norm=pa.per_sample_max_grad_norm,
                expected_batch_size=max(1, int(round(sampler.sampler.expected_batch_size))),
                loss_reduction=pa.loss_reduction,
                secure_mode=pa.secure_mode,
            )
            dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=rate))
        self._dp_hooks = hooks
        self.privacy_engine = engine
        self.dp_optimizer = dp_optimizer
        self.noise_multiplier = noise
        return dp_optimizer

    # ------------------------------------------------------------------ training step
    def compute_per_sample_loss(self, model: nn.Module, inputs: Dict[str, Any]) -> torch.Tensor:
        """``(batch,)``: each example's loss, from that example alone."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "DPTrainer: the batch has no 'labels': the collator must provide them (e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LMs)"
            )
        outputs = model(**_with_batched_positions(model, inputs))
        if self.per_sample_loss is not None:
            return self.per_sample_loss(outputs, labels)
        logits = _logits_of(outputs)
        if _is_causal_lm(model):
            return causal_lm_per_sample_loss(logits, labels)
        return classification_per_sample_loss(logits, labels)

    def _reduce(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.mean() if self.privacy_args.loss_reduction == "mean" else losses.sum()

    def _empty_real_step_inputs(self) -> None:
        """An empty logical batch still takes its (noise-only) step: give the optimizer zero
        contributions in the form it reads them."""
        opt = self.dp_optimizer
        for p in opt.params:
            if self.privacy_args.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        if self.privacy_args.grad_sample_mode == "ghost":
            opt.record_clipped_backward()
        if isinstance(opt, DPUserLevelOptimizer):
            opt.set_user_ids(torch.zeros(0, dtype=torch.long))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward of one micro-batch; clip and accumulate it, unless it closes the
        logical batch (then the Trainer's ``optimizer.step()`` clips, noises and steps)."""
        opt = self.dp_optimizer
        if opt is None or _INDEX_KEY not in inputs:
            raise ValueError(
                "DPTrainer: this batch does not come from DPTrainer's Poisson data loader: do "
                "not override get_train_dataloader (DP-SGD's accounting needs Poisson sampling)"
            )
        indices = inputs.pop(_INDEX_KEY)
        closes_logical_batch = self.accelerator.sync_gradients
        # Leftovers of the previous micro-batch (or step) go; a virtual step's sum stays.
        opt.zero_grad(set_to_none=True)
        if indices.numel() == 0:
            if closes_logical_batch:
                self._empty_real_step_inputs()
            return torch.zeros((), device=self.args.device)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = self.compute_per_sample_loss(model, inputs)
        if losses.dim() != 1 or losses.shape[0] != indices.numel():
            raise ValueError(
                f"DPTrainer: the per-sample loss has shape {tuple(losses.shape)} for a batch of "
                f"{indices.numel()} examples: it must be (batch,), one loss per example"
            )
        if isinstance(opt, DPUserLevelOptimizer):
            opt.set_user_ids(self._sampler.sampler.user_index[indices])
        if self.privacy_args.grad_sample_mode == "ghost":
            dp_loss = DPTensorFastGradientClipping(
                self._dp_hooks, opt, losses, self.privacy_args.loss_reduction
            )
            dp_loss.backward()
            loss = dp_loss.detach()
        else:
            loss = self._reduce(losses)
            loss.backward()
            loss = loss.detach()
        if not closes_logical_batch:
            opt.signal_skip_step(do_skip=True)
            opt.step()
        # Logged as the Trainer logs: the micro-batch losses of one step add up to its loss.
        return loss / self.args.gradient_accumulation_steps

    def _get_grad_norm(self, model, grad_norm=None):
        # The norm of p.grad before the step is that of a non-private gradient: never logged.
        return None

    # ------------------------------------------------------------------ privacy report
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far at ``delta`` (``privacy_args.target_delta`` by default)."""
        if self.privacy_engine is None:
            return 0.0
        accountant = self.privacy_engine.accountant
        if len(accountant) == 0:
            return 0.0
        return float(self.privacy_engine.get_epsilon(delta or self.privacy_args.target_delta))

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """The Trainer's metrics plus ``epsilon`` and ``delta`` (during and after training)."""
        if self.privacy_engine is not None and not any(k.startswith("eval_") for k in logs):
            logs = dict(logs)
            logs["epsilon"] = self.get_epsilon()
            logs["delta"] = self.privacy_args.target_delta
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.privacy_engine is not None and self.args.should_save:
            state = {
                "accountant": self.privacy_engine.accountant.state_dict(),
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self._sampler.sample_rate,
            }
            torch.save(state, os.path.join(output_dir, ACCOUNTANT_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.privacy_engine is None:
            return
        path = os.path.join(checkpoint, ACCOUNTANT_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"DPTrainer: checkpoint {checkpoint} has no {ACCOUNTANT_FILE}: the privacy spent "
                "before it is unknown, so resuming would under-report epsilon. Resume from a "
                "checkpoint written by DPTrainer"
            )
        state = torch.load(path, weights_only=False)
        if not math.isclose(state["sample_rate"], self._sampler.sample_rate, rel_tol=1e-9):
            raise ValueError(
                f"DPTrainer: the checkpoint was trained with sample rate {state['sample_rate']}, "
                f"this run samples at {self._sampler.sample_rate}: keep the batch size, "
                "gradient_accumulation_steps and dataset of the checkpointed run"
            )
        self.privacy_engine.accountant.load_state_dict(state["accountant"])
