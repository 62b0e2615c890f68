"""The hybrid cache of one node.

* MLA latent KV in fixed-size blocks (paged), one tensor per MLA layer, shared by all requests;
* per-request slots for the KDA recurrent state and the short-conv state;
* a prefix cache keyed by the hash chain of full token blocks. MLA blocks are reusable at any cached
  block boundary, but a KDA/conv state only where a state checkpoint was saved at that boundary (every
  ``checkpoint_interval`` tokens), so the reusable prefix is the longest one that has both.

Reference counts keep shared blocks alive; cached blocks and checkpoints nobody references are evicted
in LRU order when the pools run dry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prfaas.cache.block_pool import BlockPool, PoolExhausted
from prfaas.cache.hashing import hash_chain
from prfaas.kv.layout import CacheLayout
from prfaas.model.batch import CacheTensors
from prfaas.model.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.cache.store_tier import StoreTier


class CacheFull(RuntimeError):
    """The cache cannot hold what was asked for right now."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 512
    max_seqs: int = 64  # KDA/conv state slots = requests holding a cache at once
    checkpoint_interval: int = 64  # tokens between KDA state checkpoints (multiple of block_size)
    num_checkpoints: int = 64
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_blocks < 1 or self.max_seqs < 1:
            raise ValueError("block_size, num_blocks and max_seqs must be positive")
        if self.checkpoint_interval % self.block_size:
            raise ValueError(
                f"checkpoint_interval {self.checkpoint_interval} must be a multiple of "
                f"block_size {self.block_size}"
            )

    @classmethod
    def from_budget(
        cls,
        model: ModelConfig,
        budget_bytes: int,
        *,
        block_size: int = 16,
        max_seqs: int = 64,
        checkpoint_interval: int = 256,
        checkpoint_fraction: float = 0.25,
        dtype_bytes: int = 2,
    ) -> CacheConfig:
        """Split a byte budget: state slots first, then checkpoints, then MLA blocks."""
        state = model.kda_state_bytes(dtype_bytes)
        block = block_size * model.mla_bytes_per_token(dtype_bytes)
        left = budget_bytes - max_seqs * state
        if left <= 0:
            raise ValueError(f"budget {budget_bytes} B cannot hold {max_seqs} request states")
        n_ckpt = max(1, int(left * checkpoint_fraction) // max(state, 1))
        n_blocks = (left - n_ckpt * state) // max(block, 1)
        if n_blocks < 1:
            raise ValueError(f"budget {budget_bytes} B leaves no room for KV blocks")
        return cls(block_size, int(n_blocks), max_seqs, checkpoint_interval, n_ckpt)


@dataclass
class PrefixMatch:
    num_tokens: int  # reusable prefix length (block aligned)
    blocks: list[int]  # MLA blocks holding it
    checkpoint: int | None  # state checkpoint at its end (None: state starts from zero / imported)


@dataclass
class SeqCache:
    """One request's hold on the cache."""

    slot: int
    blocks: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix taken from the prefix cache (never computed here)
    hashes: list[int] = field(default_factory=list)  # hash chain of the prompt's full blocks
    prompt_len: int = 0
    num_published: int = 0  # leading blocks published in the hash index


class HybridCache:
    def __init__(
        self,
        model: ModelConfig,
        cfg: CacheConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.cfg = model, cfg
        H, D, W, k = (
            model.kda_num_heads,
            model.kda_head_dim,
            model.kda_width,
            model.short_conv_kernel_size,
        )
        n_mla, n_kda = len(model.mla_layers), len(model.kda_layers)
        self.tensors = CacheTensors(
            block_size=cfg.block_size,
            mla_kv=[
                torch.zeros(
                    cfg.num_blocks, cfg.block_size, model.latent_dim, dtype=dtype, device=device
                )
                for _ in range(n_mla)
            ],
            kda_state=[
                torch.zeros(cfg.max_seqs, H, D, D, dtype=torch.float32, device=device)
                for _ in range(n_kda)
            ],
            conv_state=[
                torch.zeros(cfg.max_seqs, 3, W, k - 1, dtype=dtype, device=device)
                for _ in range(n_kda)
            ],
        )
        self.ckpt_state = [
            torch.zeros(cfg.num_checkpoints, H, D, D, dtype=torch.float32, device=device)
            for _ in range(n_kda)
        ]
        self.ckpt_conv = [
            torch.zeros(cfg.num_checkpoints, 3, W, k - 1, dtype=dtype, device=device)
            for _ in range(n_kda)
        ]
        self.blocks = BlockPool(cfg.num_blocks, "MLA block")
        self.checkpoints = BlockPool(cfg.num_checkpoints, "state checkpoint")
        self._free_slots = list(range(cfg.max_seqs - 1, -1, -1))
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # prompt tokens looked up
        self.tier: StoreTier | None = None  # second tier (cluster prefix pool), off by default

    def attach_tier(self, tier: StoreTier) -> None:
        """Evicted cached blocks/checkpoints go to ``tier``; prefix misses are looked up there."""
        tier.bind(self)
        self.tier = tier
        self.blocks.on_evict = tier.on_block_evicted
        self.checkpoints.on_evict = tier.on_checkpoint_evicted

    def layout(self, max_tokens: int) -> CacheLayout:
        """What this cache exports per layer (``prfaas.kv``): MLA latent KV rows in the cache dtype,
        KDA recurrent state fp32, short-conv state in the cache dtype; up to ``max_tokens``."""
        m, t = self.model, self.tensors
        assert not t.kda_state or t.kda_state[0].dtype == torch.float32
        return CacheLayout.kimi_linear(
            m.fingerprint(),
            m.layer_kinds,
            kv_dim=m.latent_dim,
            kv_dtype=t.mla_kv[0].dtype if t.mla_kv else t.conv_state[0].dtype,
            kda_heads=m.kda_num_heads,
            head_dim=m.kda_head_dim,
            conv_kernel=m.short_conv_kernel_size,
            conv_dtype=t.conv_state[0].dtype if t.conv_state else t.mla_kv[0].dtype,
            max_tokens=max_tokens,
        )

    # ----- capacity ---------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def usage(self) -> float:
        return 1.0 - self.blocks.num_free / self.cfg.num_blocks

    def checkpoint_hashes(self) -> set[int]:
        """The block-chain hashes this cache holds a KDA state checkpoint for: the ends of the
        prefixes a prefill can reuse (a copy; the node's cache events report its changes)."""
        return set(self.checkpoints.by_hash)

    # ----- prefix matching --------------------------------------------------------------------
    def match(
        self, tokens: list[int], need_state: bool = True, max_tokens: int | None = None
    ) -> PrefixMatch:
        """The longest reusable prefix of ``tokens``: cached MLA blocks, and (if ``need_state``) a
        state checkpoint at its end. Leaves at least one token to compute (need_state) and never
        exceeds ``max_tokens``."""
        if not self.cfg.enable_prefix_cache:
            return PrefixMatch(0, [], None)
        bs = self.cfg.block_size
        limit = len(tokens) - 1 if need_state else len(tokens)
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        hashes = hash_chain(tokens[: (limit // bs) * bs], bs)
        if self.tier is not None:
            return self._match_with_tier(hashes, need_state)
        blocks: list[int] = []
        for h in hashes:
            b = self.blocks.lookup(h)
            if b is None:
                break
            blocks.append(b)
        if not need_state:
            return PrefixMatch(len(blocks) * bs, blocks, None)
        step = self.cfg.checkpoint_interval // bs
        for nb in range(len(blocks), 0, -1):
            if nb % step:
                continue
            c = self.checkpoints.lookup(hashes[nb - 1])
            if c is not None:
                return PrefixMatch(nb * bs, blocks[:nb], c)
        return PrefixMatch(0, [], None)

    def _match_with_tier(self, hashes: list[int], need_state: bool) -> PrefixMatch:
        """``match`` with misses looked up in the second tier; fetched blocks and checkpoints are
        published as cached (unreferenced) entries, matched ones held while fetching."""
        bs, tier = self.cfg.block_size, self.tier
        blocks: list[int] = []
        for h in hashes:
            b = self.blocks.lookup(h)
            if b is not None:
                self.blocks.incref(b)  # keep it while later fetches allocate
            else:
                if not tier.available or not self.blocks.num_free:
                    break
                b = self.blocks.allocate()
                if not tier.fetch_block(h, b):
                    self.blocks.decref(b)
                    break
                self.blocks.set_hash(b, h)
            blocks.append(b)
        ck = None
        nb_ok = len(blocks) if not need_state else 0
        if need_state:
            step = self.cfg.checkpoint_interval // bs
            for nb in range(len(blocks) - len(blocks) % step, 0, -step):
                ck = self.checkpoints.lookup(hashes[nb - 1])
                if ck is None and tier.available and self.checkpoints.num_free:
                    c = self.checkpoints.allocate()
                    if tier.fetch_state(hashes[nb - 1], c):
                        self.checkpoints.set_hash(c, hashes[nb - 1])
                        ck = c
                    self.checkpoints.decref(c)
                if ck is not None:
                    nb_ok = nb
                    break
        for b in blocks:
            self.blocks.decref(b)
        return PrefixMatch(nb_ok * bs, blocks[:nb_ok], ck)

    def hold_prefix(self, tokens: list[int], max_tokens: int | None = None) -> PrefixMatch:
        """``match(tokens, need_state=False, max_tokens)``, its MLA blocks held (referenced: no
        eviction takes them) until ``release_blocks(match.blocks)``."""
        m = self.match(tokens, need_state=False, max_tokens=max_tokens)
        for b in m.blocks:
            self.blocks.incref(b)
        return m

    def release_blocks(self, blocks: list[int]) -> None:
        """Drop the hold ``hold_prefix`` took on ``blocks``."""
        for b in blocks:
            self.blocks.decref(b)

    # ----- a request's life -------------------------------------------------------------------
    def open(
        self, prompt: list[int], need_state: bool = True, max_reuse: int | None = None
    ) -> SeqCache:
        """Take a state slot and the reusable prefix for a new request."""
        if not self._free_slots:
            raise CacheFull(f"all {self.cfg.max_seqs} request state slots are in use")
        m = self.match(prompt, need_state, max_reuse)
        slot = self._free_slots.pop()
        for b in m.blocks:
            self.blocks.incref(b)
            self.blocks.touch(b)
        self._load_slot(slot, m.checkpoint)
        if m.checkpoint is not None:
            self.checkpoints.touch(m.checkpoint)
        self.queries += len(prompt)
        self.hits += m.num_tokens
        bs = self.cfg.block_size
        return SeqCache(
            slot=slot,
            blocks=list(m.blocks),
            num_cached_tokens=m.num_tokens,
            hashes=hash_chain(prompt, bs),
            prompt_len=len(prompt),
            num_published=len(m.blocks),
        )

    def can_reserve(self, seq: SeqCache, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.blocks) <= self.blocks.num_free

    def reserve(self, seq: SeqCache, num_tokens: int) -> None:
        """Make the request's blocks cover positions [0, num_tokens)."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return
        try:
            seq.blocks.extend(self.blocks.allocate_many(need))
        except PoolExhausted as e:
            raise CacheFull(str(e)) from None

    def on_computed(self, seq: SeqCache, num_computed: int) -> None:
        """Publish the prompt's full blocks now computed and save a state checkpoint if
        ``num_computed`` sits on a checkpoint boundary inside the prompt."""
        if not self.cfg.enable_prefix_cache:
            return
        bs = self.cfg.block_size
        full = min(num_computed, seq.prompt_len) // bs
        while seq.num_published < full:
            i = seq.num_published
            self.blocks.set_hash(seq.blocks[i], seq.hashes[i])
            seq.num_published += 1
        if (
            num_computed <= seq.prompt_len
            and num_computed % self.cfg.checkpoint_interval == 0
            and num_computed > 0
        ):
            h = seq.hashes[num_computed // bs - 1]
            if self.checkpoints.lookup(h) is None:
                c = self.checkpoints.allocate()
                self._save_checkpoint(seq.slot, c)
                self.checkpoints.set_hash(c, h)
                self.checkpoints.decref(c)  # cached, evictable

    def close(self, seq: SeqCache) -> None:
        for b in seq.blocks:
            self.blocks.decref(b)
        seq.blocks = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def check(self) -> None:
        self.blocks.check()
        self.checkpoints.check()
        assert len(set(self._free_slots)) == len(self._free_slots)

    # ----- state and KV tensors (a tensor-parallel rank-0 cache mirrors these to its ranks) ------
    def _load_slot(self, slot: int, checkpoint: int | None) -> None:
        """A request's state slot from checkpoint ``checkpoint`` (None: zeros)."""
        for j in range(len(self.tensors.kda_state)):
            if checkpoint is None:
                self.tensors.kda_state[j][slot].zero_()
                self.tensors.conv_state[j][slot].zero_()
            else:
                self.tensors.kda_state[j][slot].copy_(self.ckpt_state[j][checkpoint])
                self.tensors.conv_state[j][slot].copy_(self.ckpt_conv[j][checkpoint])

    def _save_checkpoint(self, slot: int, checkpoint: int) -> None:
        """Copy state slot ``slot`` into checkpoint ``checkpoint``."""
        for j in range(len(self.ckpt_state)):
            self.ckpt_state[j][checkpoint].copy_(self.tensors.kda_state[j][slot])
            self.ckpt_conv[j][checkpoint].copy_(self.tensors.conv_state[j][slot])

    def read_kda_slot(self, j: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of KDA layer ``j``'s (j-th KDA layer) recurrent and short-conv state in slot
        ``slot``, all heads, on the cache's device."""
        return self.tensors.kda_state[j][slot].clone(), self.tensors.conv_state[j][slot].clone()

    def write_kda_slot(self, j: int, slot: int, state: torch.Tensor, conv: torch.Tensor) -> None:
        """Write all heads' recurrent and short-conv state of KDA layer ``j`` into ``slot``."""
        self.tensors.kda_state[j][slot].copy_(state)  # one copy, any device and dtype
        self.tensors.conv_state[j][slot].copy_(conv)

    def mla_rows_written(
        self, j: int, seq: SeqCache, token_start: int, token_end: int, kv: torch.Tensor
    ) -> None:
        """Called after ``kv`` was written as the latents of tokens [token_start, token_end) of
        ``seq`` in MLA layer ``j`` (a tensor-parallel cache sends them to its other ranks)."""

    def write_mla_rows(self, j: int, rows: torch.Tensor, kv: torch.Tensor) -> None:
        """Write latent rows ``kv`` (n, latent_dim) of MLA layer ``j`` at flat rows ``rows``."""
        flat = self.tensors.mla_kv[j].view(-1, self.tensors.mla_kv[j].shape[-1])
        flat.index_copy_(0, rows.to(flat.device), kv.to(flat.device, flat.dtype))

    def rows(self, seq: SeqCache, start: int, end: int) -> torch.Tensor:
        """Flat cache rows (block * block_size + offset) of positions [start, end)."""
        bs = self.cfg.block_size
        pos = torch.arange(start, end)
        bt = torch.as_tensor(seq.blocks, dtype=torch.long)
        return (bt[pos // bs] * bs + pos % bs).to(self.tensors.mla_kv[0].device)
