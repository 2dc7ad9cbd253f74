"""Reference solutions for notebook 8, the KV cache.

    python notebooks/solutions/08_kv_cache.py    # runs every checker (no model needed)

The server's own versions, with eviction and statistics: ``labserver/engine/kv_cache.py`` (the allocator,
the names and the lookup) and ``labserver/engine/scheduler.py`` (``Batched.schedule``).
"""


class BlockAllocator:
    def __init__(self, num_blocks):
        self.free_list = list(range(num_blocks))  # next to hand out first
        self.ref_count = [0] * num_blocks

    def allocate(self):
        if not self.free_list:
            return None  # the caller waits or preempts someone
        block_id = self.free_list.pop(0)
        self.ref_count[block_id] = 1
        return block_id

    def share(self, block_id):
        self.ref_count[block_id] += 1

    def free(self, block_id):
        # Only the last holder's free returns the block: the others still read its K/V.
        self.ref_count[block_id] -= 1
        if self.ref_count[block_id] == 0:
            self.free_list.append(block_id)


def block_names(token_ids, block_size, count):
    """The names of the first ``count`` blocks: each one its tokens and the name of the block before it, so
    equal names mean equal prefixes. (Nested tuples compare exactly; hashing one walks the whole prefix,
    which the engine avoids by keeping each parent's hash: ``kv_cache.BlockName``.)"""
    parent = None
    for i in range(count):
        parent = (parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        yield parent


def commit(cached, token_ids, table, block_size):
    # Only full blocks: the sequence still writes into its last block while it is partial.
    for name, block_id in zip(block_names(token_ids, block_size, len(token_ids) // block_size), table):
        cached.setdefault(name, block_id)  # a prefix computed twice: keep the first copy


def lookup(cached, token_ids, block_size):
    # At least the last prompt token is computed: its logits give the first output token.
    hits = []
    for name in block_names(token_ids, block_size, (len(token_ids) - 1) // block_size):
        if name not in cached:
            break
        hits.append(cached[name])
    return hits


def next_forward(decoding, prompt, budget):
    # One token for every decoding stream first (as far as the budget goes), then one chunk of the prompt
    # in what is left: no stream waits for more than one chunk's forward.
    work = [(seq, 1) for seq in decoding[:budget]]
    left = budget - len(work)
    if prompt is not None and left > 0:
        work.append((prompt[0], min(prompt[1], left)))
    return work


def run_checks(engine) -> bool:
    from labserver.lab import checks

    return all([checks.check_block_allocator(BlockAllocator),
                checks.check_prefix_lookup(commit, lookup),
                checks.check_chunk_choice(next_forward)])


if __name__ == "__main__":
    raise SystemExit(0 if run_checks(None) else 1)
