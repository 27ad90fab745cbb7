"""Score-based K/V eviction (`model.eviction`): policies (`policies`) and the prefill layout
that scores keys and compacts them (`layout`)."""
