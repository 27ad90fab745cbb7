"""Score-based K/V eviction (`model.eviction`): policies (`policies`), eviction while the prompt
goes in (`in_context`), and the prefill layout that scores keys and compacts them (`layout`)."""
