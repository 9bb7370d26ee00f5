"""The shapes the engine compiles for: request lengths, prefill chunk sizes, decode row buckets."""

from __future__ import annotations

MIN_CACHE = 256          # the shortest request length `generate` sizes the cache for
BUCKETS_PER_OCTAVE = 8   # cache lengths between two powers of two (a power of two itself)
MIN_CHUNK = 16           # the smallest prefill chunk (fewer shapes to compile; a few padded tokens cost little)


def cache_length(needed: int) -> int:
    """Request-length bucket `generate` sizes the cache for (so calls of similar lengths share
    its compiled programs): at least MIN_CACHE tokens, then BUCKETS_PER_OCTAVE buckets per octave."""
    needed = max(needed, MIN_CACHE)
    step = 1 << max(0, (needed - 1).bit_length() - BUCKETS_PER_OCTAVE.bit_length())
    return -(-needed // step) * step


def prefill_chunks(tokens: int, chunk: int) -> list[int]:
    """Chunk sizes of a prefill of `tokens` tokens: whole `chunk`s, then one power-of-two chunk
    (at least MIN_CHUNK) for the rest (left-padded: its last token is the prompt's last), so
    padding stays under that rest and at most a few chunk shapes compile."""
    whole, rest = divmod(tokens, chunk)
    return [chunk] * whole + ([min(chunk, max(MIN_CHUNK, 1 << (rest - 1).bit_length()))] if rest else [])


def chunk_sizes(chunk: int) -> list[int]:
    """Every chunk size `prefill_chunks` can give."""
    return sorted({chunk} | {min(chunk, max(MIN_CHUNK, 1 << i)) for i in range(chunk.bit_length())})


def decode_bucket(active: int, batch: int) -> int:
    """Rows a decode burst computes for `active` decoding rows of `batch`: a power of two, at most
    the batch."""
    return min(1 << (max(active, 1) - 1).bit_length(), batch)


def decode_buckets(batch: int) -> list[int]:
    """Every bucket `decode_bucket` can give."""
    return sorted({min(1 << i, batch) for i in range(batch.bit_length() + 1)})
