"""How much one choice on one layer damages the model, with everything else left as it is.

The damage of a setting is the KL divergence of the compressed model's output distribution from the uncompressed
model's, averaged over a fixed calibration set (the first ``data.calibration_size`` training images: never the
validation split the search chooses on, never the test split). The identity setting's damage is zero by
definition and never measured. Damages are kept per run in ``sensitivity.json`` (keyed by the settings), so a
resumed run, or a second solve, scores nothing again.

Scoring applies the setting exactly as a trial does (same techniques, same calibration data), minus recovery
training: the solver must know what a choice costs in accuracy before anything trains it back.

Most of a score is the compressed model's forward pass over the calibration images. A setting on block ``k`` of a
model whose blocks run as one ``nn.Sequential`` (timm's ViT, DeiT) leaves blocks ``0..k-1`` exactly as they were,
so their output is taken from the uncompressed model's pass (kept once per block, within ``PREFIX_BYTES``) and only
blocks ``k..`` and what follows them run: on the demo ViT this halves the pass on average. Models whose blocks are
called one by one with extra arguments (BEiT, EVA) run whole.

On a bigger model that pass is too dear for every setting (DeiT-S at 224x224 on 2 cores: ~1.5 s per setting, 1377
settings, ~35 min). ``method="fisher"`` scores a setting confined to one block by that block alone: its output on the
kept input of the uncompressed block, minus the uncompressed block's output (``d``), seen through the gradients
``g_y`` of ``log p(y)`` at that output for labels ``y`` drawn from the model's own prediction:
``damage ~= 1/2 E_y[(g_y . d)^2] = 1/2 d^T F d`` per image, ``F`` the image's whole Fisher information there (not
its diagonal, which missed how a change moves channels together). It is the second-order term of the same KL
divergence, so it is in the same units. Settings it cannot confine to one block (the head) are still scored by the
KL pass; under a global option that changes every block (compute=bf16) the block is compared with the model those
options make alone, whose own KL damage is added. ``method="auto"`` (the search's default, ``search.sensitivity``)
keeps the KL pass when its projected time fits ``seconds`` (``search.sensitivity_seconds``) and otherwise scores by
Fisher on as many calibration images as fit (at least ``MIN_FISHER_IMAGES``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.io import atomic_write_text
from autocompress.policy import parse_param_name

__all__ = ["METHODS", "Sensitivity", "kl_damage"]

FORMAT = "autocompress.sensitivity/1"
SAVE_EVERY = 25  # settings scored between two saves of sensitivity.json
#: at most this many bytes of the uncompressed model's block inputs are kept to skip unchanged blocks
PREFIX_BYTES = 256 * 2**20
METHODS = ("auto", "kl", "fisher")
#: the Fisher method keeps each block's input and output: at most this many bytes of them
FISHER_BYTES = 1024 * 2**20
MIN_FISHER_IMAGES = 16
FISHER_SAMPLES = 4  # labels drawn per image for the Fisher (its variance falls with them; each costs a backward)
#: a KL pass runs, on average, about this share of a whole forward (the unchanged blocks before a setting skipped)
KL_SHARE = 0.6


def kl_damage(reference_logits: torch.Tensor, model: nn.Module, images: torch.Tensor, batch_size: int = 256,
              prefix: "_Prefix | None" = None) -> float:
    """Mean KL(uncompressed || compressed) over ``images``, in nats; NaN outputs count as infinite damage.
    ``prefix``: the uncompressed model's input to the first block that differs (its earlier blocks are skipped)."""
    model.eval()
    total = 0.0
    with torch.inference_mode(), (prefix.skipping(model) if prefix is not None else _nothing()) as feed:
        for start in range(0, len(images), batch_size):
            if feed is not None:
                feed.current = prefix.inputs[start : start + batch_size]
            out = model(images[start : start + batch_size]).float()
            if not bool(torch.isfinite(out).all()):
                return math.inf
            ref = reference_logits[start : start + batch_size]
            total += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True))
    return max(0.0, total / max(1, len(images)))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Feed(nn.Module):
    """Stands for the skipped blocks: returns the uncompressed model's input to the first block that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.current: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current


class _Prefix:
    """The uncompressed model's input to block ``index`` of the Sequential ``container``, for every image."""

    def __init__(self, container: str, index: int, inputs: torch.Tensor) -> None:
        self.container, self.index, self.inputs = container, index, inputs

    def skipping(self, model: nn.Module):
        """Within it, ``model``'s blocks before ``index`` are one :class:`_Feed` (returned), put back after."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            blocks = model.get_submodule(self.container)
            parent_name, _, attr = self.container.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            feed = _Feed()
            setattr(parent, attr, nn.Sequential(feed, *list(blocks)[self.index:]))
            try:
                yield feed
            finally:
                setattr(parent, attr, blocks)

        return swap()


class Sensitivity:
    """Damage per settings key, measured on demand and remembered in a file.

    ``compress(params) -> model`` builds the model of one setting (the run's own way of compressing); ``images`` are
    the calibration images.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, compress: Callable[[dict[str, Any]], nn.Module],
                 path: Path | None = None, fingerprint: Mapping[str, Any] | None = None,
                 identities: Mapping[str, Any] | None = None, method: str = "kl", seconds: float = 180.0,
                 log: Callable[[str], None] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.model, self.images, self.compress = model, images, compress
        self.method, self.time_budget, self.log = method, float(seconds), log
        self.chosen: str | None = None if method == "auto" else method  # kl or fisher, once decided (or loaded)
        self.why = ""  # why auto chose what it chose
        self.identities = identities  # the space's identity values: with them, unchanged blocks are skipped
        self.path = path
        self.fingerprint = dict(fingerprint or {})
        self.damage: dict[str, float] = {}
        self.measured = 0  # scored by this object (not loaded)
        self.by_fisher = 0  # of them, scored by the Fisher estimate (the rest by the KL pass)
        self.seconds = 0.0
        self._reference: torch.Tensor | None = None
        self._prefixes: dict[tuple[str, int], _Prefix] | None = None
        self._fisher: "_Fisher | None" = None
        self._bases: dict[str, "_Base | None"] = {}  # the global options of a setting -> the model they make alone
        self._built: dict[str, nn.Module] = {}  # models built while choosing the method, scored first
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # unreadable: scored again (it only costs time)
        if data.get("format") != FORMAT or data.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            return
        method, n = data.get("method", "kl"), int(data.get("images") or len(self.images))
        if self.method not in ("auto", method) or n > len(self.images):
            return  # scored another way: scored again
        self.chosen, self.why = method, str(data.get("why") or "")
        self.images = self.images[:n]  # a resumed run scores the rest the way the first run scored
        self.damage = {str(k): float(v) for k, v in (data.get("damage") or {}).items()}

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                                                     "method": self.chosen or "kl", "images": len(self.images),
                                                     "why": self.why, "damage": self.damage},
                                                    indent=1, sort_keys=True))

    @property
    def reference(self) -> torch.Tensor:
        if self._reference is None:
            from autocompress.evaluate import logits

            started = time.perf_counter()
            self._reference = logits(self.model, self.images)
            self._forward_seconds = time.perf_counter() - started
        return self._reference

    def prefix_for(self, params: Mapping[str, Any], identities: Mapping[str, Any]) -> _Prefix | None:
        """Where the compressed model of ``params`` first differs: the kept input of that block, or None (a global
        option, a layer outside the blocks, or blocks that are not one Sequential)."""
        if self._prefixes is None:
            self._prefixes = self._capture() if not self._fisher else {  # the Fisher pass kept them already
                key: _Prefix(*key, x) for key, x in self._fisher.inputs.items() if key[1] > 0}
        found = _blocks_of(params, identities, self._prefixes)
        return None if not found else self._prefixes[min(found, key=lambda k: k[1])]

    def _capture(self) -> dict[tuple[str, int], _Prefix]:
        """Inputs of each block of the model's Sequential block containers, over the images (within PREFIX_BYTES)."""
        out: dict[tuple[str, int], _Prefix] = {}
        for name, module in _containers(self.model):
            seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(1, len(module))}
            handles = [module[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
                       for i in seen]
            try:
                with torch.inference_mode():
                    for start in range(0, len(self.images), 256):
                        self.model(self.images[start : start + 256])
            except Exception:
                continue
            finally:
                for h in handles:
                    h.remove()
            if not all(len(v) and all(isinstance(t, torch.Tensor) for t in v) for v in seen.values()):
                continue
            inputs = {i: torch.cat(v) for i, v in seen.items()}
            if sum(t.numel() * t.element_size() for t in inputs.values()) > PREFIX_BYTES:
                continue
            for i, t in inputs.items():
                out[(name, i)] = _Prefix(name, i, t)
        return out

    # --- the Fisher method ---------------------------------------------------------------------------------------

    def _choose(self, todo: list[tuple[str, dict[str, Any]]]) -> None:
        """``auto``: the KL pass when its projected time fits ``seconds``, else Fisher on as many images as fit.

        Both methods build every setting's model first, and on a big model that is most of the time (DeiT-S: ~0.25 s
        of the ~0.35 s a Fisher estimate took, the SVD of a new layer, the copy): the projection counts it, timed
        on one setting of each technique (those models are kept and scored first, nothing is built twice)."""
        n = len(self.images)
        _ = self.reference  # one whole pass over the images, timed
        per_image = self._forward_seconds / max(1, n)
        building = self._building_seconds(todo)
        projected = building + len(todo) * n * per_image * KL_SHARE
        blocks = sum(len(m) for _, m in _containers(self.model))
        built = f", {building:.0f} s of it building the compressed models"
        if projected <= self.time_budget or not blocks or self.identities is None:
            self.chosen = "kl"
            self.why = (f"KL pass projected at {projected:.0f} s{built}" + ("" if blocks else ", no Sequential blocks")
                        + f" (search.sensitivity_seconds {self.time_budget:g})")
            return
        # a setting then runs one block (and compares it) instead of most of the model
        room = self.time_budget - building
        fit = int(room / max(1e-9, len(todo) * per_image * 1.5 / blocks)) if room > 0 else 0
        keep = max(MIN_FISHER_IMAGES, min(n, fit))
        self.chosen = "fisher"
        self.why = (f"a KL pass over {len(todo)} settings on {n} images is projected at {projected / 60:.0f} min on "
                    f"this CPU{built}, over search.sensitivity_seconds ({self.time_budget:g} s): each setting is "
                    f"scored by the Fisher-weighted error of its block's output instead, on {keep} images"
                    + ("" if room > 0 else " (the fewest allowed: building the models alone does not fit)"))
        self._subset(keep)
        if self.log is not None:
            self.log(f"sensitivity: {self.why} (search.sensitivity: kl keeps the KL pass)")

    def _building_seconds(self, todo: list[tuple[str, dict[str, Any]]]) -> float:
        """Projected seconds to build the models of ``todo``: one setting of each technique is built and timed (and
        kept for :meth:`measure`), the others of that technique are taken to cost the same."""
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, params in todo:
            changed = sorted({parse_param_name(k)[0] for k, v in params.items()
                              if self.identities is None or self.identities.get(k) != v})
            groups.setdefault(",".join(changed), []).append((key, params))
        total = 0.0
        for members in groups.values():
            key, params = members[0]
            started = time.perf_counter()
            try:
                self._built[key] = self.compress(params)
            except Exception:  # noqa: BLE001 - measure() records the failure when it builds it again
                pass
            total += (time.perf_counter() - started) * len(members)
        return total

    def _subset(self, n: int) -> None:
        if n < len(self.images):
            self.images = self.images[:n]
            self._reference, self._prefixes = None, None

    def _fisher_damage(self, params: Mapping[str, Any], candidate: nn.Module) -> float | None:
        """The Fisher estimate of a setting confined to one block; None when it is not (the KL pass scores it)."""
        if self._fisher is None:
            self._fisher = _Fisher.capture(self.model, self.images) or False
            if self._fisher:
                keep = max(1, FISHER_BYTES // max(1, self._fisher.bytes_per_image()))
                if keep < len(self.images):
                    self._subset(keep)
                    self._fisher.keep(keep)
        if not self._fisher or self.identities is None:
            return None
        found = _blocks_of(params, self.identities, self._fisher.blocks)
        if not found or len(found) != 1:
            return None
        (key,) = found
        base = self._base(params)
        if base is None or not _same_except(base.model, candidate, *key):
            return None
        block = candidate.get_submodule(key[0])[key[1]]
        if base.inputs is None:
            return base.damage + self._fisher.damage(key, block)
        return base.damage + self._fisher.damage(key, block, base.inputs[key], base.outputs[key])

    def _base(self, params: Mapping[str, Any]) -> "_Base | None":
        """The model of ``params``' global options alone (the uncompressed model when they change nothing)."""
        options = {k: v for k, v in params.items() if ":" not in k}
        key = json.dumps(sorted(options.items()), default=str)
        if key not in self._bases:
            model = self.compress({**dict(self.identities or {}), **options})
            if _same_module(self.model, model):
                self._bases[key] = _Base(self.model, 0.0, None, None)
            else:
                self._bases[key] = _Base.capture(model, self.reference, self.images, self._fisher.blocks)
        return self._bases[key]

    def measure(self, wanted: Iterable[tuple[str, dict[str, Any]]], progress: bool = False,
                on_error: Callable[[str, Exception], None] | None = None) -> dict[str, float]:
        """Damage of each ``(key, params)``; the empty key (identity) is 0. A setting that fails to apply is
        infinitely damaging (the solver never chooses it) and reported through ``on_error``."""
        from tqdm.auto import tqdm

        wanted = list(dict(wanted).items())
        todo = [(k, p) for k, p in wanted if k and k not in self.damage]
        started = time.perf_counter()
        if todo and self.chosen is None:
            self._choose(todo)
        for key, params in tqdm(todo, desc=f"sensitivity ({self.chosen})", unit="setting",
                                disable=not progress or not todo, dynamic_ncols=True, leave=False):
            try:
                candidate = self._built.pop(key) if key in self._built else self.compress(params)
                damage = self._fisher_damage(params, candidate) if self.chosen == "fisher" else None
                self.by_fisher += damage is not None
                if damage is None:
                    prefix = self.prefix_for(params, self.identities) if self.identities is not None else None
                    if prefix is not None and not _same_blocks(self.model, candidate, prefix):
                        prefix = None  # a global option changed the earlier blocks too (compute=bf16): run it whole
                    damage = kl_damage(self.reference, candidate, self.images, prefix=prefix)
                self.damage[key] = damage
                del candidate
            except Exception as exc:  # noqa: BLE001 - a technique's failure only rules its setting out
                self.damage[key] = math.inf
                if on_error is not None:
                    on_error(key, exc)
            self.measured += 1
            if self.measured % SAVE_EVERY == 0:
                self.save()  # a run killed while scoring keeps what it scored (--resume scores the rest)
        self.seconds += time.perf_counter() - started
        if todo:
            self.save()
        return {k: (0.0 if not k else self.damage[k]) for k, _ in wanted}


def _same_blocks(model: nn.Module, candidate: nn.Module, prefix: _Prefix) -> bool:
    """Whether ``candidate``'s blocks before ``prefix.index`` are the uncompressed model's: same structure and the
    same tensors (so their output is the kept one)."""
    try:
        ours, theirs = model.get_submodule(prefix.container), candidate.get_submodule(prefix.container)
    except AttributeError:
        return False
    return all(_same_module(ours[i], theirs[i]) for i in range(prefix.index))


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Same structure (classes, settings, shapes, dtypes, hooks) and the same tensors."""
    from autocompress.latency_model.signatures import structure_signature

    if a is b:
        return True
    if structure_signature(a) != structure_signature(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _same_except(model: nn.Module, candidate: nn.Module, container: str, index: int) -> bool:
    """Whether ``candidate`` is ``model`` everywhere but block ``index`` of the Sequential ``container``: every other
    block, everything beside the container, and the containers on the path to it (their own tensors and hooks)."""
    try:
        ours, theirs = model.get_submodule(container), candidate.get_submodule(container)
    except AttributeError:
        return False
    if type(theirs) is not type(ours) or len(theirs) != len(ours):
        return False
    if not all(_same_module(ours[i], theirs[i]) for i in range(len(ours)) if i != index):
        return False
    path = container.split(".")
    a, b = model, candidate
    for depth in range(len(path) + 1):
        if type(a) is not type(b) or not _same_own_tensors(a, b) or _hooks(a) != _hooks(b):
            return False
        if depth == len(path):
            break
        here = dict(a.named_children())
        there = dict(b.named_children())
        if here.keys() != there.keys():
            return False
        if not all(_same_module(here[n], there[n]) for n in here if n != path[depth]):
            return False
        a, b = here[path[depth]], there[path[depth]]
    return True


def _same_own_tensors(a: nn.Module, b: nn.Module) -> bool:
    """The parameters and buffers ``a`` and ``b`` hold themselves (not their children's): same names, same tensors."""
    ours = dict([*a.named_parameters(recurse=False), *a.named_buffers(recurse=False)])
    theirs = dict([*b.named_parameters(recurse=False), *b.named_buffers(recurse=False)])
    return ours.keys() == theirs.keys() and all(
        (ours[k] is None) == (theirs[k] is None) and (ours[k] is None or torch.equal(ours[k], theirs[k]))
        for k in ours)


def _hooks(m: nn.Module) -> list[str]:
    return [getattr(h, "__qualname__", type(h).__name__) for h in [*m._forward_pre_hooks.values(),
                                                                   *m._forward_hooks.values()]]


def _containers(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The model's outermost named ``nn.Sequential`` of more than one module: its blocks, where it runs them so."""
    out: list[tuple[str, nn.Sequential]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) > 1 and name and \
                not any(name.startswith(c + ".") for c, _ in out):
            out.append((name, module))
    return out


def _blocks_of(params: Mapping[str, Any], identities: Mapping[str, Any], blocks: Iterable[tuple[str, int]]
               ) -> set[tuple[str, int]] | None:
    """The blocks (container, index) holding the layers ``params`` changes; None when a changed layer lies outside
    every block; the empty set when no layer changes (only global options, or nothing)."""
    blocks = list(blocks)
    found: set[tuple[str, int]] = set()
    for name, value in params.items():
        if ":" not in name or value == identities.get(name):
            continue
        layer = name.partition(":")[0]
        match = [key for key in blocks if layer == f"{key[0]}.{key[1]}" or layer.startswith(f"{key[0]}.{key[1]}.")]
        if not match:
            return None
        found.add(match[0])
    return found


class _Fisher:
    """Per block of the model's Sequential containers: its input and output over the images, and the gradient of
    ``log p(y)`` at its output for ``FISHER_SAMPLES`` labels ``y`` drawn from the model's own prediction (seeded).

    A change ``d`` of a block's output then costs ``1/2 E_y[(g_y . d)^2] = 1/2 d^T F d`` per image: the
    second-order term of the KL divergence, with the whole Fisher of that image (not its diagonal: a change that
    moves many channels together, as a smaller attention does, is seen as the model sees it)."""

    def __init__(self, inputs: dict, outputs: dict, grads: dict) -> None:
        self.inputs, self.outputs, self.grads = inputs, outputs, grads

    @property
    def blocks(self) -> list[tuple[str, int]]:
        return list(self.grads)

    def bytes_per_image(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in [*self.inputs.values(), *self.outputs.values()]) + \
            sum(t[:, 0].numel() * t.element_size() for t in self.grads.values())

    def keep(self, n: int) -> None:
        for d in (self.inputs, self.outputs):
            for k in d:
                d[k] = d[k][:n]
        for k in self.grads:
            self.grads[k] = self.grads[k][:, :n]

    @classmethod
    def capture(cls, model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> "_Fisher | None":
        containers = _containers(model)
        if not containers:
            return None
        blocks = [(name, i, module[i]) for name, module in containers for i in range(len(module))]
        inputs: dict = {(c, i): [] for c, i, _ in blocks}
        outputs: dict = {(c, i): [] for c, i, _ in blocks}
        grads: dict = {(c, i): [] for c, i, _ in blocks}
        generator = torch.Generator().manual_seed(0)
        live: dict = {}

        def hook(key):
            def record(module, args, output):
                if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)):
                    raise TypeError("a block takes or gives more than one tensor")
                inputs[key].append(args[0].detach().clone())
                live[key] = output
            return record

        handles = [m.register_forward_hook(hook((c, i))) for c, i, m in blocks]
        try:
            with torch.enable_grad():
                for start in range(0, len(images), batch_size):
                    live.clear()
                    x = images[start : start + batch_size].clone().requires_grad_(True)
                    logp = F.log_softmax(model(x).float(), -1)
                    if len(live) != len(blocks) or not all(t.requires_grad for t in live.values()):
                        return None
                    keys = list(live)
                    ys = torch.multinomial(logp.detach().exp(), FISHER_SAMPLES, replacement=True,
                                           generator=generator)
                    per_sample = []
                    for j in range(FISHER_SAMPLES):
                        per_sample.append(torch.autograd.grad(logp.gather(1, ys[:, j : j + 1]).sum(),
                                                              [live[k] for k in keys],
                                                              retain_graph=j + 1 < FISHER_SAMPLES))
                    for n, k in enumerate(keys):
                        outputs[k].append(live[k].detach().float())
                        grads[k].append(torch.stack([g[n].detach().float() for g in per_sample]))
        except (TypeError, RuntimeError):
            return None  # blocks that do not run one tensor to one tensor: the KL pass scores everything
        finally:
            live.clear()
            for h in handles:
                h.remove()
        return cls({k: torch.cat(v) for k, v in inputs.items()}, {k: torch.cat(v) for k, v in outputs.items()},
                   {k: torch.cat(v, dim=1) for k, v in grads.items()})

    def damage(self, key: tuple[str, int], block: nn.Module, inputs: torch.Tensor | None = None,
               outputs: torch.Tensor | None = None, batch_size: int = 64) -> float:
        """1/2 mean over images and sampled labels of (g_y . (block(x) - out))^2; ``inputs``/``outputs``: those of
        another base model than the uncompressed one (a global option's)."""
        x = self.inputs[key] if inputs is None else inputs
        y = self.outputs[key] if outputs is None else outputs
        g = self.grads[key]
        total = 0.0
        block.eval()
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                out = block(x[start : start + batch_size]).float()
                if not bool(torch.isfinite(out).all()):
                    return math.inf
                change = (out - y[start : start + batch_size]).unsqueeze(0)
                total += float((g[:, start : start + batch_size] * change).flatten(2).sum(-1).pow(2).mean(0).sum())
        return 0.5 * total / max(1, len(x))


class _Base:
    """The model a setting's global options make alone (compute=bf16 changes every block): its damage, and the input
    and output of each of its blocks, against which a setting's block is compared."""

    def __init__(self, model: nn.Module, damage: float, inputs: dict | None, outputs: dict | None) -> None:
        self.model, self.damage, self.inputs, self.outputs = model, damage, inputs, outputs

    @classmethod
    def capture(cls, model: nn.Module, reference: torch.Tensor, images: torch.Tensor, blocks: Iterable) -> "_Base | None":
        inputs: dict = {k: [] for k in blocks}
        outputs: dict = {k: [] for k in inputs}

        def hook(key):
            def record(module, args, output):
                inputs[key].append(args[0].detach().clone())
                outputs[key].append(output.detach().float())
            return record

        handles = [model.get_submodule(c)[i].register_forward_hook(hook((c, i))) for c, i in inputs]
        try:
            damage = kl_damage(reference, model, images)
        except Exception:  # noqa: BLE001 - the KL pass scores its settings instead
            return None
        finally:
            for h in handles:
                h.remove()
        if not math.isfinite(damage):
            return cls(model, math.inf, None, None)  # every setting under these options is ruled out
        return cls(model, damage, {k: torch.cat(v) for k, v in inputs.items()},
                   {k: torch.cat(v) for k, v in outputs.items()})
