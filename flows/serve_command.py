"""`cbtm serve RUN`: the ensemble over HTTP (`ensemble.server`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ensemble import Ensemble
from ensemble.server.app import ServeSettings, create_app
from ground.errors import UserInputError

log = logging.getLogger("cbtm")


def cmd_serve(args) -> int:
    import uvicorn

    if not 0 < args.port < 65536:
        raise UserInputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserInputError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    settings = ServeSettings(args.model_name or Path(args.run_dir).resolve().name, args.max_batch_size,
                             args.max_queue, args.max_prompt_tokens, args.max_tokens,
                             args.api_key or os.environ.get("CBTM_API_KEY") or None)
    ens = Ensemble.load(args.run_dir, device=args.device, top_k=args.top_k, route_temperature=args.route_temperature,
                        max_loaded_experts=args.max_loaded_experts)
    app = create_app(ens, settings)
    key = "required (Authorization: Bearer ...)" if settings.api_key else "none"
    log.info("cbtm serve: http://%s:%d  model %r, %d experts, %s backend, top_k %d, API key %s", args.host,
             args.port, settings.model, ens.n_experts, ens.backend.name, ens.top_k, key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as exc:
        raise UserInputError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}): pick another --port") from exc
    return 0
