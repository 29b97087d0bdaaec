"""The frozen reference: its identity (a hash of its config and weights) and its log-probs, computed once and stored.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --model.precompute_reference true

The reference never changes during training, so log π_ref(y|x) of every pair is a constant of the data. With
``model.precompute_reference`` the reference scores every train and validation pair once, before the first
step (each rank its share of the rows, in length-sorted batches), the values go to disk, and the reference is
dropped from memory: each training step then runs the policy alone (one forward pass of three fewer). (A LoRA
policy's reference is the policy with its adapters off: nothing leaves memory, the pass is still saved.)

The store is keyed by a fingerprint of everything the numbers depend on: the reference (its config and weights),
the tokenizer, the tokenized split (the token ids of every row, so data files, max lengths, truncation and label
noise are all in it), the max lengths and truncation mode, the log-prob aggregation and the precision. A run
that changes only the loss, β, the learning rate or the seed finds the same key and skips the pass. On load a
few random rows are scored again and compared with the store; a mismatch recomputes it.
The batch layout (``data.packing``, ``data.share_prompt``) is not in the key: the per-sequence values agree
with the padded path's within fp32 rounding (tests/test_packing.py), so one table serves every layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "index")
DEFAULT_CACHE = "~/.cache/dpo_lightning/reference_logps"
SPOT_CHECK_ROWS = 4


def cache_dir(path: str | None) -> Path:
    """``model.reference_cache_dir``, else ``$DPO_LIGHTNING_CACHE/reference_logps``, else ``~/.cache/...``."""
    if path:
        return Path(path).expanduser()
    root = os.environ.get("DPO_LIGHTNING_CACHE")
    return Path(root).expanduser() / "reference_logps" if root else Path(DEFAULT_CACHE).expanduser()


# --------------------------------------------------------------------------- fingerprints
# config keys that name where a model came from or how it generates, not what it computes
CONFIG_NOT_HASHED = {"_name_or_path", "transformers_version", "use_cache", "architectures"}


def model_fingerprint(model: nn.Module) -> str:
    """Hash of what the reference's log-probs depend on: its Hugging Face config (layer-norm epsilon, RoPE
    settings, attention scaling, dtype, ...; not its path) and every tensor of its state dict (name, dtype,
    shape, bytes). A LoRA policy's adapters-off reference hashes its base weights under the plain model's names,
    so it matches a full fine-tuning run's reference of the same base. Call it on an unsharded model."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOT_HASHED}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    state = model.base_state_dict() if hasattr(model, "base_state_dict") else model.state_dict()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor (sharded): gather it
            tensor = tensor.full_tensor()
        tensor = tensor.cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    ids = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    return hashlib.blake2b(f"{type(tokenizer).__name__}{ids}{body}".encode(), digest_size=16).hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Hash of the token ids of every row, in order (Arrow IPC bytes of each batch, chunks combined first so
    the hash depends on the content, not on how the table was assembled)."""
    import pyarrow as pa

    digest = hashlib.blake2b(digest_size=16)
    table = dataset.select_columns(list(COLUMNS)).with_format("arrow")
    for batch in table.iter(batch_size=8192):
        batch = batch.select(list(COLUMNS)).combine_chunks().replace_schema_metadata(None)  # no HF feature info
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def store_key(parts: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------- the table
class ReferenceLogps:
    """Reference log-probs of one split, looked up by dataset row (``batch["index"]``)."""

    def __init__(self, index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, key: str | None = None):
        self.key = key  # the store key: which reference, data, lengths and precision these values belong to
        size = int(index.max()) + 1 if index.numel() else 0
        self.table = torch.full((2, size), float("nan"), dtype=torch.float32)  # (chosen/rejected, row)
        self.table[0, index] = chosen.float().cpu()
        self.table[1, index] = rejected.float().cpu()
        self.rows = int(index.unique().numel())

    def to(self, device: torch.device) -> ReferenceLogps:
        self.table = self.table.to(device)
        return self

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """(2B,) chosen-then-rejected log-probs of the rows ``index`` (B,), in the collator's order."""
        if index.numel() and (index.min() < 0 or index.max() >= self.table.shape[1]):
            raise KeyError(f"rows outside the precomputed reference store: {index.tolist()}")
        values = self.table[:, index.to(self.table.device)].reshape(-1)  # chosen rows, then rejected rows
        if torch.isnan(values).any():
            raise KeyError(f"rows missing from the precomputed reference store: {index.tolist()}")
        return values

    def tensors(self) -> dict[str, torch.Tensor]:
        index = torch.nonzero(~torch.isnan(self.table[0].cpu())).reshape(-1)
        table = self.table.cpu()
        return {"index": index, "chosen": table[0, index].contiguous(), "rejected": table[1, index].contiguous()}


# --------------------------------------------------------------------------- scoring
def _lengths(dataset: Any) -> list[int]:
    import pyarrow.compute as pc

    table = dataset.select_columns(list(COLUMNS[:3])).with_format("arrow")[:]
    prompt, chosen, rejected = (pc.list_value_length(table[c]) for c in COLUMNS[:3])
    return pc.add(prompt, pc.max_element_wise(chosen, rejected)).to_pylist()


def score_rows(module: Any, dataset: Any, rows: list[int], collate: Any, batch_size: int) -> torch.Tensor:
    """Reference log-probs (3, len(rows)): dataset index, chosen, rejected, for dataset positions ``rows``.

    Runs under the trainer's precision context, as the per-step reference forward would. Under FSDP every
    rank must call this with the same number of batches (the reference forward is a collective).
    """
    plain = dataset.with_format(None)
    out = []
    context = module.trainer.precision_plugin.forward_context()
    for start in range(0, len(rows), batch_size):
        chunk = plain[rows[start : start + batch_size]]
        features = [dict(zip(chunk.keys(), values, strict=True)) for values in zip(*chunk.values(), strict=True)]
        batch = {k: v.to(module.device) for k, v in collate(features).items()}
        with torch.no_grad(), context:
            logps = module.concatenated_logps(module.reference, batch).float()
        n = batch["index"].shape[0]
        out.append(torch.stack([batch["index"].double(), logps[:n].double(), logps[n:].double()]).cpu())
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.float64)


def compute_split(module: Any, dataset: Any, collate: Any, batch_size: int) -> ReferenceLogps:
    """Score every row once; rank r takes rows r, r+W, ... (padded so every rank runs as many batches), longest
    first; the shares are gathered so every rank holds the whole table."""
    strategy = module.trainer.strategy
    world, rank = strategy.world_size, strategy.global_rank
    n = len(dataset)
    padded = list(range(n)) + [i % n for i in range(-n % world)] if n else []  # repeat rows to a multiple of W
    lengths = _lengths(dataset)
    share = sorted(padded[rank::world], key=lambda i: -lengths[i])
    local = score_rows(module, dataset, share, collate, batch_size).to(module.device)  # (3, n/W)
    gathered = strategy.all_gather(local).reshape(-1, 3, local.shape[1]) if world > 1 else local[None]
    values = gathered.permute(1, 0, 2).reshape(3, -1).cpu()
    return ReferenceLogps(values[0].long(), values[1], values[2])


def _tolerance(precision: str, reference: torch.Tensor) -> torch.Tensor:
    if str(precision).startswith(("32", "64")):
        return 1e-3 + 1e-4 * reference.abs()
    return 0.1 + 1e-2 * reference.abs()  # bf16/fp16 logits: batch composition moves sums by more


def load_or_compute(
    module: Any,
    split: str,
    dataset: Any,
    collate: Any,
    batch_size: int,
    parts: dict[str, Any],
    directory: Path,
) -> ReferenceLogps:
    """The reference log-probs of ``dataset``: from the store when its key is there (spot-checked when the
    reference is still in memory), else computed and stored. Collective: every rank calls it."""
    strategy = module.trainer.strategy
    key = store_key(parts)
    path = directory / f"{key}.safetensors"
    found = strategy.broadcast(path.exists() if strategy.global_rank == 0 else None)
    table = None
    if found:
        loaded = None
        if strategy.global_rank == 0:
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        loaded = strategy.broadcast(loaded)
        table = ReferenceLogps(loaded["index"], loaded["chosen"], loaded["rejected"])
        if module.reference is not None and not _spot_check(module, split, dataset, collate, table, path):
            table = None
        elif module.reference is None:
            rank_zero_info(f"reference log-probs ({split}): reusing {path} ({table.rows} rows)")
    if table is None:
        if module.reference is None:
            from dpo_lightning.errors import ConfigError

            raise ConfigError(
                f"reference log-probs ({split}) of this data are not in {directory}, and the reference left memory "
                "when training started (model.precompute_reference): validate or test other data in a new process "
                "(dpo-lightning validate --ckpt_path ...), which builds the reference again"
            )
        rank_zero_info(f"reference log-probs ({split}): computing {len(dataset)} rows once -> {path}")
        start = time.perf_counter()
        table = compute_split(module, dataset, collate, batch_size)
        if strategy.global_rank == 0:
            _save(path, table, parts)
        strategy.barrier()
        rank_zero_info(f"reference log-probs ({split}): computed in {time.perf_counter() - start:.1f} s")
    table.key = key
    return table.to(module.device)


def prepare_splits(
    module: Any, splits: list[str] | tuple[str, ...], known: dict[str, ReferenceLogps] | None = None
) -> dict[str, ReferenceLogps]:
    """The reference log-probs of ``splits`` of the module's data module (``PreferenceDataModule``), keyed by
    the fingerprint of everything they depend on. A table in ``known`` (the ones in memory, by split) is reused
    only when its key is this data's (validating another data module gets its own table). Collective."""
    from dpo_lightning.errors import ConfigError

    dm = module.trainer.datamodule
    if dm is None or not hasattr(dm, "datasets"):
        raise ConfigError("model.precompute_reference needs the PreferenceDataModule (data.*)")
    if getattr(dm, "unpaired", False):
        raise ConfigError(
            "model.precompute_reference: unpaired rows (KTO) need the reference live, for z0 on the mismatched rows "
            "that depend on which rows share a batch; turn it off"
        )
    common = {
        "reference": module.reference_fingerprint,
        "tokenizer": tokenizer_fingerprint(dm.tokenizer),
        "max_length": dm.max_length,
        "max_prompt_length": dm.max_prompt_length,
        "truncation_mode": dm.truncation_mode,
        "logps": "sum",  # the store holds sums; compute_loss divides for per-token means
        "precision": str(module.trainer.precision),
    }
    directory = cache_dir(module.hparams.reference_cache_dir)
    collate = dm.collator()  # padded, packed or prompt-shared: the values do not depend on the layout (packing.py)
    tables = {}
    for split in splits:
        dataset = dm.datasets[split]
        parts = {**common, "dataset": dataset_fingerprint(dataset)}
        if known and split in known and known[split].key == store_key(parts):
            tables[split] = known[split]
            continue
        tables[split] = load_or_compute(module, split, dataset, collate, dm.eval_batch_size, parts, directory)
    return tables


def _spot_check(module: Any, split: str, dataset: Any, collate: Any, table: ReferenceLogps, path: Path) -> bool:
    strategy = module.trainer.strategy
    rows = None
    if strategy.global_rank == 0:
        rows = random.SystemRandom().sample(range(len(dataset)), min(SPOT_CHECK_ROWS, len(dataset)))
    rows = strategy.broadcast(rows)
    if not rows:  # an empty split: nothing to compare
        return True
    fresh = score_rows(module, dataset, rows, collate, batch_size=len(rows))  # same rows on every rank
    try:
        stored = table.lookup(fresh[0].long()).reshape(2, -1)
    except KeyError:
        stored = torch.full_like(fresh[1:], float("nan"))
    diff = (fresh[1:] - stored).abs()
    ok = bool((diff <= _tolerance(module.trainer.precision, stored)).all())
    ok = strategy.broadcast(ok)  # rank 0 decides for all
    if ok:
        rank_zero_info(
            f"reference log-probs ({split}): reusing {path} ({table.rows} rows; {len(rows)} random rows "
            f"re-scored, max |diff| {diff.max().item():.2e})"
        )
    else:
        rank_zero_warn(
            f"reference log-probs ({split}): {path} disagrees with a fresh reference pass on rows "
            f"{fresh[0].long().tolist()} (max |diff| {diff.max().item():.3g}); recomputing it"
        )
    return ok


def _save(path: Path, table: ReferenceLogps, parts: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(table.tensors(), str(tmp), metadata={"parts": json.dumps(parts, sort_keys=True)})
    os.replace(tmp, path)  # atomic: a reader never sees half a file
