"""asv benchmarks for the two-party CrypTen backend (backends/mpc/).

Always on (a tiny DenseNet; ~1 min in all, most of it starting parties):
  MPCTinyInference   latency of one secure batch, CPU per image, bytes per image and rounds
                     per batch, for both triple sources and both ReLU protocols
  MPCRandomness      the CSPRNG's cost: rng=csprng vs rng=torch on the default model's
                     architecture (64 px, batch 8), same run (~2-4 min)
  MPCPackedReLU      the packed MSB circuit alone, on a plaintext simulation (no parties)
  MPCRingProducts    the Beaver products' local kernel: float64 limb products (backends/mpc/ring.py)
                     against torch's int64 conv2d, on two DenseNet-121 layers
  MPCEngines         every engine / protocol row side by side (CrypTen ttp, SPU SEMI2K, SPU
                     Cheetah): seconds per batch, CPU per image, bytes and messages per image
                     (SPU counts messages, not rounds); SPU rows skip without .venv-spu/

Only when asked (minutes each; set MPC_BENCH_DENSENET121=1):
  MPCRandomness224   the CSPRNG's cost at full size: DenseNet-121 at 224 px, rng=csprng vs
                     rng=torch in the same run (batch MPC_BENCH_BATCH, default 2)
  MPCDenseNet121     random-weight DenseNet-121 at 64x64, batch 1 and 8 (the 27.4 s/image
                     baseline of CrypTen's own operators); MPC_BENCH_RESOLUTION=224 for the
                     full size (~20 s per image, ~1.1 GB per party here);
                     MPC_BENCH_TRIPLES=tfp for the trusted-first-party triples;
                     MPC_BENCH_RNG=torch for CrypTen's stock (insecure) generator;
                     MPC_BENCH_ENGINES=crypten,spu-semi2k,spu-cheetah picks the engine rows
                     (default crypten,spu-semi2k; Cheetah is ~10x slower)

Parties are started outside the timed code (`setup_cache` / `setup`) and stopped after. On a
machine shared with other jobs the wall-clock timings swing widely (two parties, and with
ttp a dealer, compete for the same cores); `track_cpu_seconds_per_image` (CPU time of the
busier party) is the steadier figure.

    asv run --quick --bench bench_mpc            # under asv
    .venv/bin/python benchmarks/bench_mpc.py      # standalone: prints the figures
    MPC_BENCH_DENSENET121=1 .venv/bin/python benchmarks/bench_mpc.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

TINY = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
LABELS = ["a", "b", "c"]


def _bundle(arch, resolution, seed=0):
    import torch

    from suite.models import ModelBundle, build_densenet

    torch.manual_seed(seed)
    net = build_densenet(arch, len(LABELS))
    return ModelBundle(net=net.eval(), name="bench", architecture=arch, pathologies=LABELS,
                       resolution=resolution, source="random-init")


def _images(n, resolution, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 1, resolution, resolution), dtype=np.float32) * 2048 - 1024)


class _Running:
    """A started backend plus its images; `run` does one secure batch."""

    def start(self, bundle, images, **options):
        from backends.mpc import MPCBackend, MPCOptions
        from suite.backend import BackendContext
        from suite.meter import CommMeter

        self.images = images
        self.backend = MPCBackend.create(MPCOptions(**{"timeout_s": 3600, "batch_size": len(images),
                                                       **options}))
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-mpc-")
        self.ctx = BackendContext(model=bundle, meter=CommMeter(), workdir=Path(self._tmp.name), threads=2)
        self.backend.setup(self.ctx)
        self.ctx.meter.set_phase("online")

    def run(self):
        return self.backend.predict_proba(self.images)

    def traffic(self):
        """(bytes sent by the busier party per image, rounds per batch) of the last batch."""
        last = self.backend._batches[-1]
        t = last["traffic"]
        # SPU parties count messages, not rounds: their traffic has no "rounds" (0 here)
        return (max(t[r]["sent"] for r in (0, 1)) / last["n"],
                max(t[r].get("rounds", 0) for r in (0, 1)))

    def messages_per_image(self):
        """Messages sent by the busier party per image, last batch (SPU: send actions)."""
        last = self.backend._batches[-1]
        t = last["traffic"]
        return max(t[r].get("messages", t[r].get("rounds", 0)) for r in (0, 1)) / last["n"]

    def cpu_per_image(self):
        """CPU seconds of the busier party per image, last batch."""
        last = self.backend._batches[-1]
        return max(last["cpu_s"].values()) / last["n"]

    def stop(self):
        self.backend.teardown()
        self._tmp.cleanup()


class MPCTinyInference:
    """Secure batches of 4 images through a tiny DenseNet (growth 4, blocks (1,1), 32 px).

    All four configurations are measured once in `setup_cache` (starting parties costs
    seconds; asv would otherwise start them for every method x parameter), and the track_*
    methods report from it: median wall time of 3 batches after a warm-up, CPU time of the
    busier party, bytes it sent per image, rounds per batch.
    """

    params = (["tfp", "ttp"], ["packed", "crypten"])
    param_names = ["triples", "relu"]
    timeout = 600

    def setup_cache(self):
        import statistics
        import time

        results = {}
        for triples in self.params[0]:
            for relu in self.params[1]:
                r = _Running()
                r.start(_bundle(TINY, 32), _images(4, 32), triples=triples, relu=relu)
                try:
                    r.run()                          # warm-up (allocations, first-use imports)
                    walls = []
                    for _ in range(3):
                        start = time.perf_counter()
                        r.run()
                        walls.append(time.perf_counter() - start)
                    sent, rounds = r.traffic()
                    results[f"{triples}-{relu}"] = {"seconds": statistics.median(walls), "bytes": sent,
                                                    "rounds": rounds, "cpu": r.cpu_per_image()}
                finally:
                    r.stop()
        return results

    def track_seconds_per_batch(self, results, triples, relu):
        return results[f"{triples}-{relu}"]["seconds"]
    track_seconds_per_batch.unit = "seconds"

    def track_cpu_seconds_per_image(self, results, triples, relu):
        return results[f"{triples}-{relu}"]["cpu"]
    track_cpu_seconds_per_image.unit = "seconds"

    def track_bytes_per_image(self, results, triples, relu):
        return results[f"{triples}-{relu}"]["bytes"]
    track_bytes_per_image.unit = "bytes"

    def track_rounds_per_batch(self, results, triples, relu):
        return results[f"{triples}-{relu}"]["rounds"]
    track_rounds_per_batch.unit = "rounds"


#: engine rows: name -> options (one leaderboard row each)
ENGINES = {
    "crypten": {"engine": "crypten"},
    "spu-semi2k": {"engine": "spu", "protocol": "semi2k"},
    "spu-cheetah": {"engine": "spu", "protocol": "cheetah"},
}


def _engine_ready(engine: str) -> bool:
    if ENGINES[engine]["engine"] != "spu":
        return True
    from backends.mpc.spu_engine import spu_available

    return spu_available()


class MPCEngines:
    """Every engine / protocol row on the same tiny DenseNet (growth 4, blocks (1,1), 32 px),
    batches of 2: the one place where CrypTen, SPU SEMI2K and SPU Cheetah are compared.

    Measured once in `setup_cache` (median wall time of 2 batches after a warm-up, which
    also absorbs SPU's compilation and Cheetah's key setup); SPU rows without .venv-spu/
    are NaN. Messages: CrypTen's communication calls, SPU's send actions.
    """

    params = (list(ENGINES),)
    param_names = ["engine"]
    timeout = 900

    def setup_cache(self):
        import statistics
        import time

        results = {}
        for engine in self.params[0]:          # asv: every engine; the smoke test: the first
            options = ENGINES[engine]
            if not _engine_ready(engine):
                continue
            r = _Running()
            extra = {"triples": "ttp"} if options["engine"] == "crypten" else {}
            r.start(_bundle(TINY, 32), _images(2, 32), **options, **extra)
            try:
                r.run()
                walls = []
                for _ in range(2):
                    start = time.perf_counter()
                    r.run()
                    walls.append(time.perf_counter() - start)
                sent, _ = r.traffic()
                results[engine] = {"seconds": statistics.median(walls), "bytes": sent,
                                   "messages": r.messages_per_image(), "cpu": r.cpu_per_image()}
            finally:
                r.stop()
        return results

    def _get(self, results, engine, key):
        return results[engine][key] if engine in results else float("nan")

    def track_seconds_per_batch(self, results, engine):
        return self._get(results, engine, "seconds")
    track_seconds_per_batch.unit = "seconds"

    def track_cpu_seconds_per_image(self, results, engine):
        return self._get(results, engine, "cpu")
    track_cpu_seconds_per_image.unit = "seconds"

    def track_bytes_per_image(self, results, engine):
        return self._get(results, engine, "bytes")
    track_bytes_per_image.unit = "bytes"

    def track_messages_per_image(self, results, engine):
        return self._get(results, engine, "messages")
    track_messages_per_image.unit = "messages"


class MPCRandomness:
    """The CSPRNG's cost: the default model's architecture (small DenseNet, 64 px, random
    weights), batches of 8, dealer triples, with rng=csprng (AES-256-CTR) and rng=torch
    (CrypTen's stock MT19937, insecure), both measured in the same `setup_cache`.

    Median wall time of 2 batches after a warm-up, and CPU time of the busier party per
    image (the steadier figure on a shared machine).
    """

    params = (["csprng", "torch"],)
    param_names = ["rng"]
    timeout = 1800

    def setup_cache(self):
        import statistics
        import time

        from suite.models import SMALL_DENSENET

        results = {}
        for rng in self.params[0]:
            r = _Running()
            r.start(_bundle(SMALL_DENSENET, 64), _images(8, 64), triples="ttp", rng=rng)
            try:
                r.run()
                walls = []
                for _ in range(2):
                    start = time.perf_counter()
                    r.run()
                    walls.append(time.perf_counter() - start)
                results[rng] = {"seconds": statistics.median(walls), "cpu": r.cpu_per_image()}
            finally:
                r.stop()
        return results

    def track_seconds_per_batch(self, results, rng):
        return results[rng]["seconds"]
    track_seconds_per_batch.unit = "seconds"

    def track_cpu_seconds_per_image(self, results, rng):
        return results[rng]["cpu"]
    track_cpu_seconds_per_image.unit = "seconds"


class MPCRandomness224:
    """The CSPRNG's cost at full size (only with MPC_BENCH_DENSENET121=1; ~1 min of party
    start-up and about 12 s per image per row on 2 quiet cores: 11.1 s CSPRNG, 12.1 s
    rng=torch, `suite run` with batch 4 on 4 NIH images, 2026-12-02, README "MPC engines"):
    random DenseNet-121 at 224 px, one batch of MPC_BENCH_BATCH images (default 2), dealer triples, rng=csprng against
    rng=torch in the same `setup_cache`. Wall time per image, CPU time of the busier party per
    image, bytes sent by it per image and rounds per image. Without the variable the cache is
    empty and every method is skipped, so `asv run --quick` stays fast.
    """

    params = (["csprng", "torch"],)
    param_names = ["rng"]
    timeout = 3600
    number = 1
    repeat = 1
    warmup_time = 0

    def setup_cache(self):
        import time

        if os.environ.get("MPC_BENCH_DENSENET121") != "1":
            return None
        from suite.models import DENSENET121

        n = int(os.environ.get("MPC_BENCH_BATCH", "2"))
        results = {}
        for rng in self.params[0]:
            r = _Running()
            r.start(_bundle(DENSENET121, 224), _images(n, 224), triples="ttp", rng=rng)
            try:
                start = time.perf_counter()
                r.run()
                sent, rounds = r.traffic()
                results[rng] = {"seconds": (time.perf_counter() - start) / n, "cpu": r.cpu_per_image(),
                                "bytes": sent, "rounds": rounds / n}
            finally:
                r.stop()
        return results

    def setup(self, *args):          # asv passes the params (and, for track_*, the cache)
        if os.environ.get("MPC_BENCH_DENSENET121") != "1":
            raise NotImplementedError("set MPC_BENCH_DENSENET121=1 to run (minutes)")

    def track_seconds_per_image(self, results, rng):
        return results[rng]["seconds"]
    track_seconds_per_image.unit = "seconds"

    def track_cpu_seconds_per_image(self, results, rng):
        return results[rng]["cpu"]
    track_cpu_seconds_per_image.unit = "seconds"

    def track_bytes_per_image(self, results, rng):
        return results[rng]["bytes"]
    track_bytes_per_image.unit = "bytes"

    def track_rounds_per_image(self, results, rng):
        return results[rng]["rounds"]
    track_rounds_per_image.unit = "rounds"


class MPCPackedReLU:
    """The packed MSB circuit on 2^16 elements, both parties simulated in one process."""

    def setup(self):
        import torch

        from backends.mpc.protocol import MASK63, TOP

        g = torch.Generator().manual_seed(0)
        n = 1 << 16
        self.s0 = torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g, dtype=torch.long)
        self.s1 = torch.randint(-2 ** 40, 2 ** 40, (n,), generator=g, dtype=torch.long) - self.s0
        self.low = torch.stack([self.s0 & MASK63, self.s1 & MASK63])
        self.top = TOP

    def time_msb_circuit(self):
        import torch

        from backends.mpc.protocol import carry_tree

        def sim_and(xs, ys):
            return [torch.stack([(x[0] ^ x[1]) & (y[0] ^ y[1]), torch.zeros_like(x[0])])
                    for x, y in zip(xs, ys)]

        zero = torch.zeros_like(self.low[0])
        (g,) = sim_and([torch.stack([self.low[0], zero])], [torch.stack([zero, self.low[1]])])
        carry_tree(g, torch.stack([self.low[0] ^ self.top, self.low[1]]), sim_and)


class MPCRingProducts:
    """The Beaver products' local kernel on one DenseNet-121 layer (224 px, one image, one
    thread): `backends.mpc.ring`'s float64 limb products against torch's int64 kernel, which
    has no BLAS path (on torch 2.14.1 it made DenseNet-121 at 224 px ~6x slower than the
    session-1 figure). Both give the same int64 result bit for bit (tests/test_mpc_ring.py)."""

    params = (["ring", "int64"], ["conv3x3", "conv1x1"])
    param_names = ["kernel", "layer"]
    #: at 224 px: a denseblock2 layer's 3x3 conv (128 -> 32 channels, 28 x 28) and a
    #: denseblock3 1x1 conv with the split pre-activation (2 x 512 -> 128 channels, 14 x 14)
    LAYERS = {"conv3x3": ((1, 128, 28, 28), (32, 128, 3, 3), 1),
              "conv1x1": ((1, 1024, 14, 14), (128, 1024, 1, 1), 0)}

    def setup(self, kernel, layer):
        import torch

        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        shape_x, shape_w, self.padding = self.LAYERS[layer]
        self.x = torch.randint(-2 ** 63, 2 ** 63 - 1, shape_x, generator=g)
        self.w = torch.randint(-2 ** 63, 2 ** 63 - 1, shape_w, generator=g)

    def time_conv2d(self, kernel, layer):
        import torch

        from backends.mpc.ring import ring_conv2d

        fn = ring_conv2d if kernel == "ring" else torch.conv2d
        fn(self.x, self.w, None, 1, self.padding)


class MPCDenseNet121:
    """Random-weight DenseNet-121, one secure batch (only with MPC_BENCH_DENSENET121=1),
    for each engine row named in MPC_BENCH_ENGINES (default crypten,spu-semi2k)."""

    params = (list(ENGINES), [1, 8])
    param_names = ["engine", "batch"]
    timeout = 3600
    number = 1
    repeat = 1
    warmup_time = 0

    def setup(self, engine, batch):
        if os.environ.get("MPC_BENCH_DENSENET121") != "1":
            raise NotImplementedError("set MPC_BENCH_DENSENET121=1 to run (minutes per batch)")
        if engine not in os.environ.get("MPC_BENCH_ENGINES", "crypten,spu-semi2k").split(","):
            raise NotImplementedError(f"{engine} not in MPC_BENCH_ENGINES")
        if not _engine_ready(engine):
            raise NotImplementedError(f"{engine} needs .venv-spu/ (bash scripts/setup.sh)")
        from suite.models import DENSENET121

        resolution = int(os.environ.get("MPC_BENCH_RESOLUTION", "64"))
        options = dict(ENGINES[engine])
        if options["engine"] == "crypten":
            options["triples"] = os.environ.get("MPC_BENCH_TRIPLES", "ttp")
            options["rng"] = os.environ.get("MPC_BENCH_RNG", "csprng")
        self.r = _Running()
        self.r.start(_bundle(DENSENET121, resolution), _images(batch, resolution), **options)

    def teardown(self, engine, batch):
        if hasattr(self, "r"):               # setup skipped: nothing started
            self.r.stop()

    def time_secure_batch(self, engine, batch):
        self.r.run()

    def track_seconds_per_image(self, engine, batch):
        import time

        start = time.perf_counter()
        self.r.run()
        return (time.perf_counter() - start) / batch
    track_seconds_per_image.unit = "seconds"


def main() -> None:
    results = MPCTinyInference().setup_cache()
    for key, r in results.items():
        triples, relu = key.split("-")
        print(f"tiny  triples={triples:3s} relu={relu:7s} batch of 4: {r['seconds']:6.2f} s wall, "
              f"{r['cpu'] * 1e3:6.1f} ms CPU/image (busier party), "
              f"{r['bytes'] / 1e6:6.2f} MB/image sent (busier party), {r['rounds']} rounds", flush=True)
    if os.environ.get("MPC_BENCH_SKIP_RNG") != "1":
        rng = MPCRandomness().setup_cache()
        for name, r in rng.items():
            print(f"small DenseNet 64 px rng={name:6s} batch of 8: {r['seconds']:6.2f} s wall, "
                  f"{r['cpu'] * 1e3:7.1f} ms CPU/image (busier party)", flush=True)
        print(f"CSPRNG added online latency: {rng['csprng']['seconds'] / rng['torch']['seconds'] - 1:+.1%} "
              f"wall, {rng['csprng']['cpu'] / rng['torch']['cpu'] - 1:+.1%} CPU", flush=True)
    for engine, r in MPCEngines().setup_cache().items():
        print(f"tiny  engine={engine:11s} batch of 2: {r['seconds']:6.2f} s wall, "
              f"{r['cpu'] * 1e3:7.1f} ms CPU/image (busier party), {r['bytes'] / 1e6:6.2f} MB/image sent, "
              f"{r['messages']:.0f} messages/image (busier party)", flush=True)
    if os.environ.get("MPC_BENCH_DENSENET121") == "1":
        full = MPCRandomness224().setup_cache()
        for name, r in full.items():
            print(f"DenseNet-121 224 px rng={name:6s}: {r['seconds']:6.2f} s/image wall, {r['cpu']:6.2f} s "
                  f"CPU/image (busier party), {r['bytes'] / 1e9:5.2f} GB/image sent, "
                  f"{r['rounds']:.0f} rounds/image", flush=True)
        print(f"CSPRNG added latency at 224 px: {full['csprng']['seconds'] / full['torch']['seconds'] - 1:+.1%} "
              f"wall, {full['csprng']['cpu'] / full['torch']['cpu'] - 1:+.1%} CPU", flush=True)
        batches = [int(b) for b in os.environ.get("MPC_BENCH_BATCHES", "1,8").split(",")]
        for engine in MPCDenseNet121.params[0]:
            for batch in batches:
                bench = MPCDenseNet121()
                try:
                    bench.setup(engine, batch)
                except NotImplementedError:
                    continue
                try:
                    seconds = bench.track_seconds_per_image(engine, batch)
                    sent, _ = bench.r.traffic()
                    print(f"DenseNet-121 {os.environ.get('MPC_BENCH_RESOLUTION', '64')} px {engine} "
                          f"batch {batch}: {seconds:.2f} s/image wall, {bench.r.cpu_per_image():.2f} s "
                          f"CPU/image, {sent / 1e6:.1f} MB/image sent, "
                          f"{bench.r.messages_per_image():.0f} messages/image", flush=True)
                finally:
                    bench.teardown(engine, batch)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
