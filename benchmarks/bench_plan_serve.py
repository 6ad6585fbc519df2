"""Times `simcost plan serve` on the README's question (c): 200 rank-8/16 adapters of
Llama-3.1-8B, uniform popularity, prompts 256-2048 and outputs 64-512 tokens, 5 req/s, TTFT p99
<= 1 s over 2,000 simulated requests, every priced GPU profile (target: well under a minute
on 2 CPU cores). Reports wall and CPU seconds, simulations run and the answer."""
import os
import platform
import time

from simcost.plan.serve_search import plan_serve


def main():
    print(f"machine: {platform.machine()} {platform.processor() or ''} python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs")
    t0, c0 = time.perf_counter(), time.process_time()
    p = plan_serve("llama-3.1-8b", adapters=200, ranks="8,16", rate=5, input_len="256:2048",
                   output_len="64:512", slo_ttft=1, requests=2000)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"plan serve (c): {wall:.1f} s wall, {cpu:.1f} s CPU, {p.simulations} simulations, "
          f"{len(p.candidates)} fleets searched, {p.pruned} settings pruned")
    print(p.answer)


if __name__ == "__main__":
    main()
