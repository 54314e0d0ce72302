"""`vlmeff demo`: a Gradio page showing which patches a method keeps and what it costs the answer
(`vlmeff.demo.app`); the plain functions behind it are in `vlmeff.demo.core` and `vlmeff.demo.runner`."""
import argparse

DESCRIPTION = ("A Gradio page: the patches a method keeps (per stage and view), and the answer, visual tokens, FLOPs "
               "and latency with and without pruning")


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="tiny-llava-evqa",
                        help="an embedded model (tiny-llava-evqa, tiny-llava-scenes, tiny-llava-moe-evqa, "
                             "tiny-vit-evqa), a transformers LVLM (local folder or hub name) or a timm ViT "
                             "('timm/<name>', from the hub) (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link")


def run(args):
    from .app import launch

    launch(args.model, args.host, args.port, args.share)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlmeff.demo", description=DESCRIPTION)
    add_arguments(parser)
    run(parser.parse_args(argv))
