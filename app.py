"""Start the chest-CT workstation: `python app.py [--host 127.0.0.1] [--port 7860] [--preset demo|paper] [--weights DIR]`.

Opens a Gradio app at http://HOST:PORT (the demo preset, embedded in assets/, works offline on a CPU).
"""
from __future__ import annotations

import argparse
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chest-CT workstation (Gradio app).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--preset", choices=("demo", "paper"), default="demo",
                        help="demo: the small embedded models; paper: the published architectures")
    parser.add_argument("--weights", default=None,
                        help="CT CLIP checkpoint folder (demo: default assets/ctclip; paper: a folder with "
                             "CT-CLIP_v2.pt or its converted safetensors)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import CSS, THEME, AppConfig, build_app  # the package app/ (a folder wins over this file's name)

    demo = build_app(AppConfig(preset=args.preset, weights=args.weights))
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, theme=THEME, css=CSS, ssr_mode=False,
                footer_links=[], show_error=False)


if __name__ == "__main__":
    main()
