"""Start the chest-CT workstation:
`python app.py [--host 127.0.0.1] [--port 7860] [--preset demo|paper] [--weights DIR]`.

Opens a Gradio app at http://HOST:PORT (the demo preset, embedded in assets/, works offline on a CPU). Listening
beyond this machine (`--host 0.0.0.0`) requires login credentials from $CT_WORKSTATION_AUTH or a file
(`--auth-file`); app/server.py holds the limits (upload size, queue, temporary-file lifetime) the README states.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from app.server import ServerLimits

    defaults = ServerLimits()
    parser = argparse.ArgumentParser(description="Chest-CT workstation (Gradio app).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1); any other "
                        "address requires login credentials")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--preset", choices=("demo", "paper"), default="demo",
                        help="demo: the small embedded models; paper: the published architectures")
    parser.add_argument("--weights", default=None,
                        help="CT CLIP checkpoint folder (demo: default assets/ctclip; paper: a folder with "
                             "CT-CLIP_v2.pt or its converted safetensors)")
    parser.add_argument("--auth-file", default=None,
                        help="a file of user:password lines that may log in (or set $CT_WORKSTATION_AUTH="
                             "user:password); passwords are never taken on the command line")
    parser.add_argument("--max-upload-mb", type=int, default=defaults.max_upload_mb,
                        help=f"largest upload accepted, MB (default {defaults.max_upload_mb})")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help=f"requests that may wait while {defaults.concurrency} run; more are told the app is "
                             f"busy (default {defaults.queue_size})")
    parser.add_argument("--cache-max-age-s", type=int, default=defaults.cache_max_age_s,
                        help=f"temporary files (uploads, rendered planes) are deleted after this many seconds "
                             f"(default {defaults.cache_max_age_s})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.server import ServerLimits, private_files_app_kwargs, server_credentials
    from engine.errors import UserError

    try:
        if args.max_upload_mb < 1 or args.queue_size < 1 or args.cache_max_age_s < 1:
            raise UserError("--max-upload-mb, --queue-size and --cache-max-age-s must be at least 1.")
        credentials = server_credentials(args.host, args.auth_file)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = ServerLimits(max_upload_mb=args.max_upload_mb, queue_size=args.queue_size,
                          cache_max_age_s=args.cache_max_age_s,
                          cache_sweep_s=max(1, min(ServerLimits.cache_sweep_s, args.cache_max_age_s // 2)))
    from app.ui import CSS, THEME, AppConfig, build_app  # the package app/ (a folder wins over this file's name)

    demo = build_app(AppConfig(preset=args.preset, weights=args.weights, limits=limits))
    demo.queue(**limits.queue_kwargs())
    print(f"Serving on http://{args.host}:{args.port} ({limits.summary()}"
          f"{'; login required' if credentials else ''}).", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, theme=THEME, css=CSS, ssr_mode=False,
                footer_links=[], show_error=False, auth=credentials, app_kwargs=private_files_app_kwargs(),
                **limits.launch_kwargs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
