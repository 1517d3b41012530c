"""The baselines for `serve_load.py`: the original design, and a server that does nothing.

plain: one FastAPI + uvicorn process that decodes the upload, crops it and runs one forward pass per request, the way
the original service did. It uses the project's own decode, crop and model code (`app.images`, `app.transforms`,
`serving.detector.run_batch` with a batch of one: channels_last, inference mode, the same precision), so the only
difference from the Ray Serve application is the serving architecture: no batching, no replicas.

noop: a raw ASGI app that reads the whole upload and answers a fixed JSON, in as many processes as asked. Nothing is
faster to serve, so with enough processes its throughput is the load generator's own ceiling on this machine (and its
latency the network and HTTP floor).

    python benchmarks/plain_fastapi_app.py --checkpoint DIR --port 8100 [--device cuda]
    python benchmarks/plain_fastapi_app.py --noop --workers 4 --port 8101
"""

# No `from __future__ import annotations`: FastAPI must see the real UploadFile type in the route signature.
import argparse
import json
import time
from pathlib import Path
from typing import Any


def build_plain_app(checkpoint: str, device: str, precision: str = "auto") -> Any:
    from fastapi import FastAPI, File, HTTPException, UploadFile

    from app.config import Settings
    from app.contract import confidence_of, verdict_of
    from app.images import ImageError, decode_image
    from app.transforms import eval_preprocess
    from serving.runtime import available_cores, load_active, pick_device, run_batch

    torch_device = pick_device(device == "cuda")
    if torch_device.type == "cpu":
        import torch

        torch.set_num_threads(available_cores())
    active = load_active(Settings(), checkpoint, torch_device, warmup_sizes=(1,), precision=precision)
    app = FastAPI(title="plain baseline")

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> dict[str, Any]:
        started = time.perf_counter()
        data = await file.read()
        try:
            crop = eval_preprocess(decode_image(data), active.crop_size)
        except ImageError as err:
            raise HTTPException(400, str(err)) from err
        probability = float(run_batch(active, [crop])[0])
        return {
            "prediction": verdict_of(probability, active.threshold),
            "probability": probability,
            "confidence": confidence_of(probability, active.threshold),
            "inference_time_ms": (time.perf_counter() - started) * 1000.0,
            "model_version": active.version,
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


_NOOP_BODY = json.dumps({"prediction": "real", "probability": 0.0}).encode()


async def noop_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": _NOOP_BODY})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (app.model format)")
    parser.add_argument("--noop", action="store_true", help="serve the do-nothing app instead")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=1, help="processes of the noop server")
    args = parser.parse_args()
    import uvicorn

    if args.noop:
        uvicorn.run(
            "plain_fastapi_app:noop_app",
            app_dir=str(Path(__file__).parent),
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=False,
            log_level="warning",
        )
        return
    if args.checkpoint:
        app = build_plain_app(args.checkpoint, args.device, args.precision)
    else:
        parser.error("give --checkpoint or --noop")
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
