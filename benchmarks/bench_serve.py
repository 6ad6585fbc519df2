"""Times `simulate_serve` on 10 minutes of traffic at 10 req/s with 100 adapters (target <= 2 s
per scheduler), and reports the simulation speed in simulated requests per wall-clock second."""
import platform
import time

from simcost.serve import simulate_serve


def main():
    kw = dict(adapters=100, ranks=[8, 16, 32, 64], rate=10, duration=600, input_len="8:512",
              output_len="8:512", seed=0)
    simulate_serve("llama-2-7b", "a100-80gb-sxm", duration=5, adapters=2)   # warm imports
    print(f"machine: {platform.machine()} {platform.processor() or ''} python "
          f"{platform.python_version()}")
    for sched, devices in (("slora", 1), ("fcfs", 1), ("mixed", 1), ("slora", 4)):
        t0 = time.perf_counter()
        r = simulate_serve("llama-2-7b", "a100-80gb-sxm", scheduler=sched, devices=devices, **kw)
        dt = time.perf_counter() - t0
        print(f"{sched:<6} devices {devices}: {r.n_requests} requests, {r.iterations} iterations: "
              f"{dt:.3f} s, {r.n_requests / dt:,.0f} requests/s of simulation "
              f"({r.throughput_req_s:.2f} req/s simulated)")


if __name__ == "__main__":
    main()
