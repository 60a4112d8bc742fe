"""The statistics pass (SPEC §1): mean gradient and K-FAC factors, streamed into fp32 buffers one layer at a time."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_positive_int
from ..quant import keep_4bit_differentiable_
from ..targets import is_quantized, is_transposed, out_in_features, resolve_targets, unwrap_model
from .distributed import agree_step, all_gather_objects, all_reduce_counts, all_reduce_sum_, sum_to_owner, world
from .sketch import DEFAULT_SKETCH_SEED, GradSketch, gaussian_matrix, sketch_sizes
from .types import LayerStats
from ..zero3 import gather_zero3, is_zero3_param

logger = logging.getLogger(__name__)
KINDS = ("grad", "kfac", "act")
GRAD_FROM = ("auto", "weight", "hooks")


def grad_from_hooks(module: nn.Module, grad_from: str = "auto") -> bool:
    """Whether a target's gradient is built from its inputs and output gradients (G_b = Δᵀ X) rather than read from
    `weight.grad`: always with `hooks`; with `auto` for the layers that cannot hold a usable weight gradient, a
    bitsandbytes 4-bit/int8 weight (no gradient at all), an FSDP2 shard (whose gradient is one rank's slice of
    the mean over processes, where the pass needs this process's own full sum) and a ZeRO-3 partition (likewise)."""
    if grad_from not in GRAD_FROM:
        raise ValueError(f"grad_from={grad_from!r}: choose from {GRAD_FROM}.")
    if grad_from != "auto":
        return grad_from == "hooks"
    return is_quantized(module) or hasattr(module.weight, "full_tensor") or is_zero3_param(module.weight)


def normalize_kinds(kinds: Iterable[str] | str) -> frozenset[str]:
    """Validate statistic kinds; `kfac` needs the gradient too (Ḡ is derived from it)."""
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = kinds - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"Unknown statistics kinds {sorted(unknown) or kinds}; choose from {KINDS}.")
    if "kfac" in kinds:
        kinds |= {"grad", "act"}
    return frozenset(kinds)


def _rows(t: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The token rows of a (batch, seq, d) activation, padding removed, as fp32 (N, d)."""
    if mask is None:
        rows = t.reshape(-1, t.shape[-1])
    elif t.shape[:-1] == mask.shape:
        rows = t[mask]
    elif t.dim() == 2 and t.shape[0] == mask.numel():
        rows = t[mask.reshape(-1)]
    else:
        raise ValueError(
            f"Cannot align the input of {name!r} (shape {tuple(t.shape)}) with attention_mask {tuple(mask.shape)}: "
            "pass batches whose attention_mask matches the token layout, or drop attention_mask to count every token."
        )
    return rows.float()


class StatsRecorder:
    """Hooks that stream a model's per-layer statistics into fp32 buffers, restoring every flag on exit.

    Only target weights require grad inside the context; each weight's gradient is added to its fp32 buffer as soon
    as autograd has accumulated it, then freed, so no layer's gradient outlives its own backward step.
    With `sketch=(k, l)` no weight requires grad at all: each target's input does, and the gradient is accumulated
    as the two sketches G·Ω and Ψᵀ·G from the layer's inputs and output gradients (see `stats.sketch`). The targets
    in `hook_grad` (quantized or FSDP2-sharded weights, see `grad_from_hooks`) get their dense gradient the same way,
    as Σ Δᵀ X in fp32, with no weight gradient.

    With `owners` ({target: rank}, a sharded pass under torch.distributed) each batch's contribution of a layer is
    sent to the layer's owner inside the hook that computed it (`sum_to_owner`), and only the owner keeps a sum:
    every process must then run the same passes in lockstep (a blank pass, `paused`, contributes zeros), and
    `finalize` returns the owned layers only.
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], kinds, accumulate_on=None, train_mode=False,
                 sketch: tuple[int, int] | None = None, sketch_seed: int = DEFAULT_SKETCH_SEED,
                 grad_from: str = "auto", owners: Mapping[str, int] | None = None):
        self.model, self.targets, self.kinds = model, targets, normalize_kinds(kinds)
        self.owners, self.rank = (None if owners is None else dict(owners)), world()[0]
        self.hook_grad = {n for n, m in targets.items() if grad_from_hooks(m, grad_from)} if sketch is None else set()
        self.accumulate_on, self.train_mode = accumulate_on, train_mode
        self.sketch, self.sketch_seed = sketch, sketch_seed
        self.sk_y, self.sk_z, self._gauss, self._sketch_rows = {}, {}, {}, {}
        self.mask: torch.Tensor | None = None
        self.paused = False  # a blank pass (lockstep): the hooks record nothing (sharded: they contribute zeros)
        self.n_batches = 0
        self.fisher_weight, self.loss_tokens_known = 0, True  # Σ_b T_b·N_b (see LayerStats.fisher_weight)
        self.calls = dict.fromkeys(targets, 0)
        self.tokens = dict.fromkeys(targets, 0)
        self.out_calls = dict.fromkeys(targets, 0)
        self.grad, self.in_sum, self.out_sum = {}, {}, {}
        self.share: dict[str, str] = {}  # module -> module whose input covariance it reuses
        self._seen: dict[int, tuple[str, weakref.ref]] = {}
        self._handles = []

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self):
        m = self.model
        self._saved_flags = {id(p): p.requires_grad for p in m.parameters()}
        self._saved_grads = {n: mod.weight.grad for n, mod in self.targets.items()}
        for mod in self.targets.values():
            mod.weight.grad = None  # else autograd accumulates into (and mutates) a pre-existing .grad
        self._saved_mode = m.training
        m.train(self.train_mode)
        for p in m.parameters():
            p.requires_grad_(False)
        for name, mod in self.targets.items():
            self._install(name, mod)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.model.parameters():
            p.requires_grad_(self._saved_flags.get(id(p), p.requires_grad))
        for n, mod in self.targets.items():
            mod.weight.grad = self._saved_grads[n]
        self.model.train(self._saved_mode)
        return False

    def _buffer(self, store: dict, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        if name not in store:
            device = self.accumulate_on if self.accumulate_on is not None else like.device
            store[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        return store[name]

    def _install(self, name: str, mod: nn.Module) -> None:
        transposed = is_transposed(mod)
        from_hooks = "grad" in self.kinds and (self.sketch is not None or name in self.hook_grad)
        if from_hooks:
            self._handles.append(mod.register_forward_pre_hook(_input_requires_grad, with_kwargs=True))
        elif "grad" in self.kinds:
            mod.weight.requires_grad_(True)

            def on_grad(p, name=name):
                if self.owners is not None:  # sharded: this batch's gradient, in fp32, to its owner
                    g = p.grad.t() if transposed else p.grad
                    p.grad = None
                    self._add(self.grad, name, g.to(torch.float32).contiguous())
                    self.calls[name] += not self.paused
                    return
                if self.paused:
                    p.grad = None
                    return
                g = p.grad.t() if transposed else p.grad
                home = torch.device(self.accumulate_on) if self.accumulate_on is not None else g.device
                if name not in self.grad and g.dtype == torch.float32 and g.device == home:
                    self.grad[name] = g.contiguous()  # an fp32 first gradient becomes the accumulator: no copy
                else:
                    buf = self._buffer(self.grad, name, g.shape, g)
                    buf.add_(g.to(buf.device, torch.float32))
                self.calls[name] += 1
                p.grad = None  # free at once: never all layers' gradients in model dtype

            self._handles.append(mod.weight.register_post_accumulate_grad_hook(on_grad))
        if "act" in self.kinds or from_hooks:
            self._handles.append(mod.register_forward_hook(
                lambda m, args, kwargs, out, name=name: self._on_forward(name, args[0] if args else kwargs["input"], out),
                with_kwargs=True))

    def _add(self, store: dict, name: str, c: torch.Tensor) -> None:
        """Add one batch's fp32 contribution `c` to `name`'s sum in `store`; sharded, every process's contribution
        (zeros from a blank pass) goes to the layer's owner, which adds them in rank order (`sum_to_owner`)."""
        def add(t):
            buf = self._buffer(store, name, c.shape, c)  # on this process's device (or accumulate_on)
            buf.add_(t.to(buf.device))

        if self.owners is None:
            add(c)
            return
        if self.paused:
            c.zero_()
        sum_to_owner(c, self.owners[name], add)

    def _on_forward(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.paused and self.owners is None:
            return
        if "act" in self.kinds:
            self._on_forward_act(name, x, out)
        if self.sketch is not None and out.requires_grad:
            cached = self._sketch_rows.get(id(x))  # q/k/v reading one input share one copy of its rows
            if cached is not None and cached[0]() is x:
                rows = cached[1]
            else:
                rows = _rows(x.detach(), self.mask, name)  # kept until this layer's backward, as autograd keeps x
                self._sketch_rows[id(x)] = (weakref.ref(x), rows)
            out.register_hook(lambda g, name=name, mask=self.mask, rows=rows: self._on_sketch_grad(name, g, mask, rows))
        elif name in self.hook_grad and "grad" in self.kinds and out.requires_grad:
            x = x.detach()  # every token, padding included, as autograd's weight gradient counts them
            out.register_hook(lambda g, name=name, x=x: self._on_hook_grad(name, g, x))

    def _on_hook_grad(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        with torch.no_grad():
            d, rows = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            self._add(self.grad, name, d.T @ rows)  # G_b = Δᵀ X, the layer's weight gradient, in fp32
            self.calls[name] += not self.paused

    def _gaussian(self, rows: int, cols: int, device) -> torch.Tensor:
        key = (rows, cols, device)
        if key not in self._gauss:  # one Ω (Ψ) per shape, shared by every layer of that shape
            self._gauss[key] = gaussian_matrix(rows, cols, self.sketch_seed, device)
        return self._gauss[key]

    def _on_sketch_grad(self, name: str, g: torch.Tensor, mask, x: torch.Tensor) -> None:
        with torch.no_grad():
            d = _rows(g, mask, name)  # (N, m)
            (m, k), (n, l) = (d.shape[1], self.sketch[0]), (x.shape[1], self.sketch[1])
            self._add(self.sk_y, name, d.T @ (x @ self._gaussian(n, k, x.device)))  # Δᵀ(XΩ) = G_b Ω
            self._add(self.sk_z, name, (d @ self._gaussian(m, l, d.device)).T @ x)  # (ΔΨ)ᵀX = Ψᵀ G_b
            self.calls[name] += not self.paused

    def _on_forward_act(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        mask = self.mask
        # sharded: a layer shares the Σ of an earlier reader of its input only when one process owns both
        key = id(x) if self.owners is None else (id(x), self.owners[name])
        owner = self._seen.get(key)
        shared = owner is not None and owner[1]() is x and owner[0] != name
        if shared and self.n_batches == 0:
            self.share.setdefault(name, owner[0])
        if self.share.get(name) is not None and not (shared and owner[0] == self.share[name]):
            raise RuntimeError(f"{name!r} shared its input with {self.share[name]!r} in one batch but not in another.")
        with torch.no_grad():
            rows = _rows(x.detach(), mask, name)
            self.tokens[name] += 0 if self.paused else rows.shape[0]
            if name not in self.share:
                self._seen[key] = (name, weakref.ref(x))
                self._add(self.in_sum, name, rows.T @ rows)
        if "kfac" in self.kinds and out.requires_grad:
            out.register_hook(lambda g, name=name, mask=mask: self._on_out_grad(name, g, mask))

    def _on_out_grad(self, name: str, g: torch.Tensor, mask) -> None:
        with torch.no_grad():
            j = _rows(g, mask, name)
            self._add(self.out_sum, name, j.T @ j)
            self.out_calls[name] += not self.paused

    # -- batches ---------------------------------------------------------------------------------------------
    def begin_batch(self, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
                    input_ids: torch.Tensor | None = None) -> None:
        self.mask = None if attention_mask is None else attention_mask.bool()
        if "kfac" in self.kinds:
            t_b = loss_tokens(labels)
            n_b = int(self.mask.sum()) if self.mask is not None else (input_ids.numel() if input_ids is not None else None)
            if t_b is None or n_b is None:
                self.loss_tokens_known = False
            else:
                self.fisher_weight += t_b * n_b
        self._seen.clear()
        self._sketch_rows.clear()

    def end_batch(self) -> None:
        self.n_batches += 1
        self.clear_batch()

    def clear_batch(self) -> None:
        """Forget the batch's inputs and mask (after a batch, and around a blank pass)."""
        self._seen.clear()
        self._sketch_rows.clear()
        self.mask = None

    # -- result ----------------------------------------------------------------------------------------------
    def finalize(self, normalize_grad_by: str = "batches") -> dict[str, LayerStats]:
        """All-reduce the sums over processes, normalise, check, and return module name -> LayerStats.

        Sharded (`owners`), the sums are already on their owners: nothing but the counts is all-reduced, and the
        result holds only the layers this process owns (each equal to the unsharded pass's).

        Args:
            normalize_grad_by: "batches" (SPEC: G = Σ_b ∇L_b / iters) or "calls" (per-module count of backward
                passes that reached the weight, PEFT's `preprocess_loraga` semantics).
        """
        names = list(self.targets)
        device = next(self.model.parameters()).device
        local = [self.n_batches] + [d[n] for d in (self.calls, self.tokens, self.out_calls) for n in names]
        local += [self.fisher_weight, int(not self.loss_tokens_known)]
        counts = all_reduce_counts(local, device)
        fisher_weight = counts[-2] if counts[-1] == 0 else 0
        # Every rank must issue the same all-reduces: a rank that saw no batch has not detected the shared inputs.
        shares = {tuple(sorted(s.items())) for nb, s in all_gather_objects((self.n_batches, self.share)) if nb > 0}
        if len(shares) > 1:
            raise RuntimeError(f"Processes disagree on which target modules share their input: {sorted(shares)}")
        self.share = dict(shares.pop()) if shares else self.share
        k = len(names)
        n_batches = counts[0]
        calls, tokens, out_calls = (dict(zip(names, counts[1 + i * k : 1 + (i + 1) * k])) for i in range(3))
        if n_batches == 0 and normalize_grad_by == "batches":
            raise ValueError("The statistics pass saw no batches: `batches` is empty.")
        out = {}
        for name in names:
            own = self.owners is None or self.owners[name] == self.rank
            st = LayerStats(n_tokens=tokens[name], n_batches=n_batches if normalize_grad_by == "batches" else calls[name])
            m, n = out_in_features(self.targets[name])
            if "grad" in self.kinds and self.sketch is not None:
                k, l = self.sketch
                reached = calls[name] > 0
                y = _div(self._reduced(self.sk_y, name, (m, k), "gradient", reached), max(st.n_batches, 1))
                z = _div(self._reduced(self.sk_z, name, (l, n), "gradient", reached), max(st.n_batches, 1))
                st.grad_sketch = GradSketch(y, z, self.sketch_seed) if own else None
            elif "grad" in self.kinds:
                st.grad = _div(self._reduced(self.grad, name, (m, n), "gradient", calls[name] > 0),
                               max(st.n_batches, 1))
            if "act" in self.kinds and tokens[name] == 0:
                raise ValueError(f"{name!r} saw no non-padding tokens: check attention_mask and the batches.")
            if "act" in self.kinds and name not in self.share:
                st.in_cov = _div(self._reduced(self.in_sum, name, (n, n), "input", True), tokens[name])
            if "kfac" in self.kinds:
                st.out_cov = _div(self._reduced(self.out_sum, name, (m, m), "output gradient", out_calls[name] > 0),
                                  tokens[name])
                st.fisher_weight = fisher_weight
            if own:
                out[name] = st
        for name, owner in self.share.items():
            if name in out:  # sharded: the two layers have one owner (see _on_forward_act)
                out[name].in_cov = out[owner].in_cov
        _check_finite(out, agree=self.owners is not None)
        return out

    def _reduced(self, store: dict, name: str, shape, what: str, reached: bool) -> torch.Tensor | None:
        # A process whose shard never reached this layer still joins the all-reduce, with zeros.
        weight = self.targets[name].weight
        if self.owners is not None:  # sharded: the owner holds the sum already; None on the other processes
            local = store.pop(name, None)
            if not reached:
                raise ValueError(f"{name!r} received no {what} during the statistics pass: is it used in the forward "
                                 "pass, and does the loss depend on it? Remove it from target_modules otherwise.")
            if self.owners[name] != self.rank:
                return None
            return local if local is not None else torch.zeros(shape, dtype=torch.float32,
                                                               device=self.accumulate_on or weight.device)
        local = store.pop(name, None)
        if local is None:
            local = torch.zeros(shape, dtype=torch.float32, device=self.accumulate_on or weight.device)
        total = all_reduce_sum_(local)
        if not reached:
            raise ValueError(
                f"{name!r} received no {what} during the statistics pass: is it used in the forward pass, and does "
                "the loss depend on it? Remove it from target_modules otherwise."
            )
        return total


def loss_tokens(labels) -> int | None:
    """T_b, the number of terms a batch's mean loss averages: for token labels (integer, 2-D or more), the positions
    a Hugging Face causal LM scores (shifted labels ≠ −100); for one label per example (1-D, or float targets), the
    batch size. None without labels (a custom loss_fn): the K-FAC curvature's scale is then unknown."""
    if not torch.is_tensor(labels):
        return None
    if labels.dim() >= 2 and not labels.is_floating_point():
        return int((labels[..., 1:] != -100).sum())
    return int(labels.shape[0])


def _input_requires_grad(module, args, kwargs):
    """Sketch mode: make a target's input a grad-requiring leaf, so backward reaches it with no weight gradients."""
    x = args[0] if args else kwargs.get("input")
    if torch.is_tensor(x) and x.is_floating_point() and not x.requires_grad and torch.is_grad_enabled():
        x.requires_grad_(True)
        x.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))  # its gradient is never needed


def _div(t: torch.Tensor | None, d) -> torch.Tensor | None:
    """The sum `t` divided by `d`, in place: `t` is an accumulator this pass owns (a copy would double the largest
    statistic at the peak)."""
    return None if t is None else t.div_(d)


def _finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether every entry of `t` is finite, checked `chunk` entries at a time (one d × d mask at once would add a
    quarter of the statistic's bytes at the peak)."""
    if t.dim() < 2 or t.numel() <= chunk:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def _check_finite(stats: dict[str, LayerStats], agree: bool = False) -> None:
    """Raise if any statistic is NaN/inf; with `agree` (a sharded pass: each process holds its own layers) on every
    process, naming the bad ones of all."""
    bad = [f"{n}.{k}" for n, st in stats.items() for k, t in st.tensors().items() if not _finite(t)]
    if agree:
        bad = [b for part in all_gather_objects(bad) for b in part]
    if bad:
        raise ValueError(
            f"Non-finite (NaN/inf) statistics in {bad[:8]}{' ...' if len(bad) > 8 else ''}: the loss or activations "
            "overflowed. Use fp32 or bf16 instead of fp16 for the statistics pass, or check the data."
        )


def _checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


def batch_to_device(batch: Mapping, device: torch.device) -> dict:
    """A batch (a dict, or transformers' BatchEncoding, which its collators return) with its tensors on `device`."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"Each batch must be a mapping of tensors (input_ids, attention_mask, labels): it must be a "
                        f"dict or a BatchEncoding, got {type(batch).__name__}")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_not_empty(batch: dict, i: int) -> None:
    """Raise if the batch has no examples (a model fails on it deep inside, with a shape error)."""
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == 0:
            raise ValueError(f"Statistics batch {i} is empty: its {key!r} has 0 rows (shape {tuple(value.shape)}). "
                             "Drop empty batches (e.g. a last partial batch of 0 examples) from `batches`.")


def checked_loss(loss, loss_fn) -> torch.Tensor:
    """The loss of one batch, refused unless it is a one-element tensor (what backward() can start from)."""
    source = "loss_fn(model, batch)" if loss_fn is not None else "model(**batch).loss"
    if not torch.is_tensor(loss):
        raise TypeError(f"{source} must return a scalar tensor (the loss, with its graph), got "
                        f"{type(loss).__name__}: return the tensor itself, not loss.item() or a number.")
    if loss.numel() != 1:
        raise ValueError(f"{source} must return a scalar tensor, got shape {tuple(loss.shape)}: reduce the per-example "
                         "losses (e.g. .mean()), as a loss with reduction='mean' does.")
    return loss


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """`model(**batch).loss`, refused when the model returns none (no labels)."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss: give batches with 'labels', or pass loss_fn(model, batch).")
    return loss


_END = object()


def check_shardable(model: nn.Module) -> None:
    """Refuse sharded statistics on an FSDP2-sharded or ZeRO-3-partitioned model (every process must hold the whole
    model).

    Raises:
        ValueError: the model has FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3 parameters.
    """
    if fsdp_sharded(model):
        raise ValueError("Sharded statistics (InitConfig(stats_sharding=True), collect_stats(shard=True)) reduce each "
                         "layer's statistics to one owner process and need every process to hold the whole model "
                         "(DDP, accelerate launch without FSDP); this model's weights are sharded (FSDP2 fully_shard "
                         "or DeepSpeed ZeRO-3), and its statistics pass all-reduces them instead. Drop "
                         "stats_sharding there, or bound the memory with grouped sweeps (stats_memory=...).")


def _shard_owners(model: nn.Module, targets, kinds, sketch) -> dict[str, int] | None:
    """The owner rank of each target for a sharded pass (None single-process: nothing to shard), checked to be the
    same on every process."""
    check_shardable(model)
    world_size = world()[1]
    if world_size == 1:
        return None
    from ..plan import stats_owners

    owners = stats_owners(model, targets, kinds, world_size, sketch)
    if len({tuple(sorted(o.items())) for o in all_gather_objects(owners)}) > 1:
        raise ValueError("Sharded statistics: the processes assign different owners to the target layers (their "
                         "models or targets differ): every process must load the same model and targets.")
    return owners


def _borrow_first(first, device):
    """Sharded lockstep, step 0: a process with no batch at all takes the lowest such rank's first batch for its
    blank passes (what it holds does not matter: a blank pass contributes zeros). One object gather, two when
    a process has none."""
    have = all_gather_objects(first is not None)
    if all(have):
        return first
    donor = have.index(True)
    cpu = None if world()[0] != donor else {k: v.cpu() if torch.is_tensor(v) else v for k, v in first.items()}
    given = all_gather_objects(cpu)[donor]
    return first if first is not None else batch_to_device(given, device)


def _one_batch(model, recorder: StatsRecorder, batch, i: int, device, needs_backward: bool, loss_fn,
               record: bool = True, agree: bool = False) -> None:
    """One forward (and backward) pass on `batch`; with record=False nothing is recorded (a lockstep rank with no
    batch left runs such a pass so that its collectives match the other ranks'). With `agree` (a sharded pass,
    whose backward hooks reduce to the owners) the processes agree on the loss before the backward: all of them run
    it, or all raise."""
    batch = batch_to_device(batch, device)
    _check_not_empty(batch, i)
    recorder.paused = not record
    if record:
        recorder.begin_batch(batch.get("attention_mask"), batch.get("labels"), batch.get("input_ids"))
    else:
        recorder.clear_batch()
    if needs_backward:
        error = None
        try:
            loss = checked_loss((loss_fn or default_loss)(model, batch), loss_fn)
            if not loss.requires_grad:
                raise ValueError("The loss does not depend on any target module's weights: check target_modules "
                                 "and loss_fn.")
            if not torch.isfinite(loss).all():
                raise ValueError(f"Non-finite loss {loss.item()} on statistics batch {i}: check the data and dtype.")
        except Exception as e:  # noqa: BLE001 - raised here, or by agree_step on every process
            if not agree:
                raise
            error = e
        if agree:
            agree_step(error, True, f"statistics batch {i}")
        (loss if record else loss * 0).backward()
    else:
        (loss_fn(model, batch) if loss_fn else model(**batch))
    if record:
        recorder.end_batch()
    else:
        recorder.clear_batch()
    recorder.paused = False


def fsdp_sharded(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 (`fully_shard`) shard or a DeepSpeed ZeRO-3 partition: each forward gathers
    weights on every process, which must then run the same passes."""
    return any((hasattr(p, "device_mesh") and hasattr(p, "full_tensor")) or is_zero3_param(p)
               for p in model.parameters())


def reshard_fsdp(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back in its sharded state. A forward without a backward leaves a root FSDP
    module's weights unsharded (FSDP2 keeps them for the backward it expects); a weight written then (an init's
    offset) would go into the unsharded copy that FSDP drops, and the shard would keep the old weight."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 has no such module
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def collect_stats(
    model: nn.Module,
    batches: Iterable[dict],
    target_modules,
    kinds: Iterable[str] | str = ("grad",),
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    *,
    max_batches: int | None = None,
    accumulate_on: str | torch.device | None = None,
    train_mode: bool = False,
    progress: bool = True,
    sketch: int | tuple[int, int] | None = None,
    sketch_seed: int = DEFAULT_SKETCH_SEED,
    grad_from: str = "auto",
    shard: bool = False,
) -> dict[str, LayerStats]:
    """Run the statistics pass of SPEC §1 over `batches`.

    Args:
        model: the base model (un-wrapped; DDP wrappers are stripped).
        batches: iterable of HF-style dicts (`input_ids`, `attention_mask`, `labels`); this process's shard.
        target_modules: a LoraConfig, a regex or a list of names (PEFT's matching).
        kinds: any of "grad" (mean gradient G), "kfac" (G, Σ, C), "act" (Σ only, forward passes only).
        loss_fn: `loss_fn(model, batch) -> scalar`; default `model(**batch).loss`.
        max_batches: stop after this many batches.
        accumulate_on: device for the fp32 accumulators (e.g. "cpu" to offload them); default: the weight's device.
        train_mode: run with dropout on (default off, so the pass is deterministic and identical across processes).
        progress: show a progress bar on rank 0.
        sketch: accumulate the gradient as a streaming randomized sketch instead of densely: k, or (k, l) with
            l >= k (default l = 2k + 1). Memory per layer O(m·k + l·n) instead of m·n; the methods then use the
            rank-k reconstruction. Needs a `grad` (or `kfac`) kind.
        sketch_seed: seed of the sketches' Gaussian test matrices (the same on every process).
        grad_from: where a dense gradient comes from: "weight" (autograd's `weight.grad`, freed layer by layer),
            "hooks" (Σ Δᵀ X from each layer's input and output gradient, in fp32; no weight gradient exists), or
            "auto" (default): hooks for bitsandbytes-quantized and FSDP2-sharded weights, `weight.grad` otherwise.
        shard: under torch.distributed with every process holding the whole model (DDP-style), shard the statistics
            over the processes (`InitConfig(stats_sharding=True)`): each target has an owner rank (`plan.stats_owners`:
            input-sharing units balanced by bytes), each batch's contribution is sent to it in the hook that
            computes it (added in rank order: the single-process sum), and only the owner keeps a sum, so each process holds about 1/world of the statistics. The
            processes pass in lockstep (one with no batch left runs a blank pass contributing zeros; one with none
            at all borrows another's first batch for it), and every target must be reached on every pass (no
            data-dependent routing such as mixture-of-experts). Refused on FSDP2-sharded models (their pass is the
            all-reduced one); single-process it changes nothing.

    Returns:
        dict module name -> LayerStats, identical on every process (sums are all-reduced when torch.distributed is
        initialised). With `shard` and more than one process: only the layers this process owns, each equal to the
        unsharded result.

    Raises:
        ValueError: unknown targets or kinds, empty batches, a non-finite loss or statistic, a layer without gradient,
            `shard` on an FSDP2-sharded model.
        RankFailedError: under torch.distributed, on every process but the one whose batch failed (that one raises
            its own error): each batch step agrees on a failure flag (one int64 all-reduce), so no process is left
            waiting in a collective.
    """
    from ..config import _accumulate_device  # InitConfig's check of the same option (config imports this module)

    if max_batches is not None:
        try:
            check_positive_int("max_batches", max_batches)
        except ValueError as err:
            raise ValueError(f"{err} (or None: every batch)") from None
    accumulate_on = _accumulate_device(accumulate_on)  # before any pass: a bad device fails in a gradient hook
    model = unwrap_model(model)
    kinds = normalize_kinds(kinds)
    targets = resolve_targets(model, target_modules)
    keep_4bit_differentiable_(model)  # an earlier evaluation may have moved 4-bit layers to a kernel with no backward
    if "kfac" in kinds and train_mode and _checkpointing(model):  # transformers checkpoints in train mode only
        raise ValueError("kfac statistics need each layer's forward to run once per batch, but gradient checkpointing "
                         "re-runs it during backward: call model.gradient_checkpointing_disable() or use train_mode=False.")
    device = next(model.parameters()).device
    needs_backward = "grad" in kinds
    if sketch is not None:
        if "grad" not in kinds:
            raise ValueError(f"sketch= sketches the gradient, but kinds={sorted(kinds)} has none: add 'grad' or 'kfac'.")
        sketch = sketch_sizes(*((sketch,) if isinstance(sketch, int) else tuple(sketch)))
    owners = _shard_owners(model, targets, kinds, sketch) if shard else None
    recorder = StatsRecorder(model, targets, kinds, accumulate_on=accumulate_on, train_mode=train_mode,
                             sketch=sketch, sketch_seed=sketch_seed, grad_from=grad_from, owners=owners)
    total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(total=total, desc="lorafa statistics", disable=not progress or world()[0] != 0, leave=False)
    # FSDP gathers each unit's weights, a sharded pass reduces in its hooks: all ranks pass together
    lockstep = world()[1] > 1 and (owners is not None or fsdp_sharded(model))
    with recorder, (torch.enable_grad() if needs_backward else torch.no_grad()), gather_zero3(model):
        batch_iter, done, step, first = None, False, 0, None
        while True:  # all processes step together: a failure, or one running out early, is agreed on by all
            error, batch = None, _END
            if not done and (max_batches is None or step < max_batches):
                try:
                    batch_iter = iter(batches) if batch_iter is None else batch_iter
                    batch = next(batch_iter, _END)
                    if lockstep and batch is not _END:  # a bad batch fails here, agreed on before the pass
                        batch = batch_to_device(batch, device)
                        _check_not_empty(batch, step)
                except Exception as e:  # noqa: BLE001 - re-raised by agree_step, here and (named) on the others
                    error = e
            active = batch is not _END
            done = done or not active
            first = batch if first is None and active else first
            if lockstep:  # does any rank have a batch this step? Then every rank runs a pass (its own, or a blank)
                if error is None and first is None and owners is None:
                    error = ValueError("Under FSDP every process must have at least one statistics batch (each "
                                       "pass gathers the sharded weights on all ranks): use at least as many "
                                       "statistics batches (init.iters) as processes.")
                if not agree_step(error, active, f"statistics batch {step}"):
                    break
                if owners is not None and step == 0:
                    first = _borrow_first(first, device)
            if error is None and (active or lockstep):
                try:
                    _one_batch(model, recorder, batch if active else first, step, device, needs_backward, loss_fn,
                               record=active, agree=owners is not None)
                except Exception as e:  # noqa: BLE001
                    error = e
            if not agree_step(error, active, f"statistics batch {step}"):
                break
            step += 1
            bar.update(int(active))
    bar.close()
    stats = recorder.finalize("batches")
    logger.info("statistics %s over %d batches for %d layers", sorted(kinds), recorder.n_batches, len(stats))
    return stats
