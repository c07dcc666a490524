"""An OpenAI-compatible HTTP server for the engine (needs the serve extra: pip install -e '.[serve]').

  python -m engine.serve --model DIR [--policy st3 --ratio 0.5 ...] [--port 8000]

Endpoints: POST /v1/chat/completions (text and image_url parts, LLaVA-1.5 template, SSE streaming),
POST /v1/completions (raw prompts), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Bad input is HTTP 400 with an OpenAI-style error body, a full waiting queue (--max-waiting) is 503;
no response ever carries a traceback. Every response has an extra "st3" field with the request's
visual-token and KV figures.
"""

import argparse  # no `from __future__ import annotations`: FastAPI reads the route annotations
import logging
import sys
import time
import uuid
from pathlib import Path

from .async_llm import AsyncLLM
from .errors import EngineError, QueueFullError, RequestError
from .generate import Parser, UsageError, add_device_arguments, add_model_arguments
from .policy_flags import add_policy_arguments, policy_from_args
from .serve_media import MediaPolicy, load_images
from .serve_protocol import APIError, ParsedRequest, parse_chat, parse_completion
from .serve_responses import (ChunkWriter, LogprobFormatter, chat_response, completion_response, failure, prometheus,
                              sse)

log = logging.getLogger("st3")


def build_app(engine: AsyncLLM, model_name: str, media: MediaPolicy | None = None, default_max_tokens: int = 256):
    """The FastAPI app serving `engine` under `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    media = media or MediaPolicy()
    app = FastAPI(title="st3-engine", docs_url=None, redoc_url=None)
    started = int(time.time())
    max_n = engine.llm.config.max_num_seqs  # n's bound: see serve_protocol.sampling_params

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return error(APIError(str(e.detail), status=e.status_code, kind="not_found_error"
                              if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return error(APIError(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error in a request")
        return error(APIError(f"internal error: {type(e).__name__}", status=500, kind="internal_error"))

    async def read_json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    async def run(parsed: ParsedRequest, chat: bool):
        images = await load_images(parsed.image_urls, media)
        request = {"prompt": parsed.prompt, "images": images}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stream = engine.generate(request, parsed.params, request_id=rid)
        try:
            first = await anext(stream)  # a bad request fails here, before any byte is sent
        except RequestError as e:
            raise APIError(str(e)) from None
        except QueueFullError as e:
            raise APIError(str(e), status=503, kind="server_overloaded", code="queue_full") from None
        except EngineError as e:
            raise APIError(str(e), status=503, kind="server_unavailable") from None
        lp = None if parsed.logprobs is None else LogprobFormatter(engine.llm.tokenizer, parsed.logprobs)
        if parsed.stream:
            writer = ChunkWriter(chat, rid, int(time.time()), model_name, parsed.include_usage, lp, parsed.params.n)
            return StreamingResponse(events(stream, first, writer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out = first
        try:
            async for out in stream:
                pass
        finally:
            await stream.aclose()
        if failure(out):
            raise APIError(failure(out), status=500, kind="internal_error")
        body = (chat_response if chat else completion_response)(rid, int(time.time()), model_name, out, lp)
        return JSONResponse(body)

    async def events(stream, first, writer: ChunkWriter):
        out = first
        try:
            yield writer.first()
            while True:
                if failure(out):  # the rest of the request (n > 1: its other completions) is aborted below
                    yield sse(APIError(failure(out), status=500, kind="internal_error").body())
                    break
                chunk = writer.update(out)
                if chunk:
                    yield chunk
                if out.finished:
                    yield writer.last(out)
                    break
                out = await anext(stream)
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()  # a client that went away aborts its request (all n completions) here

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(parse_chat(await read_json(request), model_name, default_max_tokens, max_n), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(parse_completion(await read_json(request), model_name, default_max_tokens, max_n),
                         chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "st3-engine", "max_model_len": engine.llm.max_model_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(await engine.metrics_async()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def build_parser() -> Parser:
    ap = Parser(prog="python -m engine.serve", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-waiting", type=int, help="refuse new requests (HTTP 503) while this many are queued")
    ap.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    m = ap.add_argument_group("images")
    m.add_argument("--no-fetch-urls", action="store_true", help="refuse http(s) image URLs (data URIs only)")
    m.add_argument("--allowed-local-media-path", metavar="DIR", help="allow file:// image URLs under DIR")
    m.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per image URL fetch")
    m.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest image accepted, in bytes")
    ap.add_argument_group("visual-token policy").add_argument("--policy", default="full",
                                                              help="full, fastv, pvtp or st3")
    add_policy_arguments(ap)
    e = ap.add_argument_group("engine")
    add_device_arguments(e)
    e.add_argument("--num-kv-blocks", type=int)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prompt tokens one prefill step takes")
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--max-images-per-prompt", type=int, default=1,
                   help="ST3 sizes its decode score buffers for this many images per prompt")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--seed", type=int, help="seed for requests that bring none (reproducible sampling)")
    return ap


def make_server(args):
    """(engine, app, model name) from parsed flags; bad settings raise ValueError-family errors."""
    from .llm import LLM
    for name in ("max_waiting", "default_max_tokens", "max_image_bytes"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.fetch_timeout > 0:
        raise UsageError(f"--fetch-timeout must be > 0, got {args.fetch_timeout}")
    local = None
    if args.allowed_local_media_path:
        local = Path(args.allowed_local_media_path)
        if not local.is_dir():
            raise UsageError(f"--allowed-local-media-path {str(local)!r} is not a directory")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, revision=args.revision, policy=policy_from_args(args),
              num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              max_images_per_prompt=args.max_images_per_prompt, enforce_eager=args.enforce_eager, seed=args.seed)
    # As vLLM: a model named by its hub id is served under that id, a directory under its name.
    hub_id = args.model is not None and not Path(args.model).exists()
    name = args.served_model_name or (args.model if hub_id else llm.model_dir.resolve().name)
    engine = AsyncLLM(llm, max_waiting=args.max_waiting)
    media = MediaPolicy(not args.no_fetch_urls, local, args.fetch_timeout, args.max_image_bytes)
    return engine, build_app(engine, name, media, args.default_max_tokens), name


def main(argv: list[str] | None = None) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: engine.serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        engine, app, name = make_server(args)
    except (ValueError, OSError, EngineError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"serving {name!r} (policy {engine.llm.policy.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
