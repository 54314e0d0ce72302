"""The Gradio page: an image (upload or example), a question, a method and a budget in; the kept patches per stage,
the unpruned and the pruned answer side by side, tokens, FLOPs and latency out. Bad input is a message in the
page (`core.DemoInputError`), never a traceback."""
import gradio as gr

from .core import DemoInputError, open_image, stage_strip
from .examples import examples
from .runner import DemoModel

DEFAULT_METHOD = "cls"
DEFAULT_BUDGET = 0.25
HEADERS = ["", "unpruned", "pruned"]


def answer(demo: DemoModel, image, question, method, keep):
    """The page's handler: (the stages' overlays in one picture or None, the comparison rows, a status message:
    the stages' captions, or why no overlay is drawn, or what is wrong with the input)."""
    try:
        result = demo.ask(image, question, method, keep)
    except DemoInputError as error:
        return None, [], f"**Input error:** {error}"
    if not result.overlays:
        return None, result.table, result.note
    return stage_strip(result.overlays), result.table, "; ".join(caption for _, caption in result.overlays)


def show(path):
    """The upload's preview and a status message: (image or None, message)."""
    if path is None:
        return None, ""
    try:
        return open_image(path), ""
    except DemoInputError as error:
        return None, f"**Input error:** {error}"


def build(demo: DemoModel) -> gr.Blocks:
    """The app for one loaded model (the model loads once; every request reuses it)."""
    what = "question about the image" if demo.kind == "lvlm" else "(a classifier: no question)"
    with gr.Blocks(title="vlmeff demo") as app:
        gr.Markdown(f"## vlmeff: which visual tokens does a method keep, and what does it cost the answer?\n"
                    f"Model: `{demo.name}` ({'vision-language model' if demo.kind == 'lvlm' else 'ViT'}). Pruned "
                    "patches are dimmed, kept ones framed; patches merged into one token share its colour.")
        with gr.Row():
            with gr.Column():
                # a file, not gr.Image: Gradio would decode an upload itself and fail on a corrupt one with an
                # error of its own; `open_image` checks it and says what is wrong
                image = gr.File(label="image (upload, or pick an example below)", file_types=["image"],
                                type="filepath", elem_id="image")
                preview = gr.Image(label="the image", interactive=False, elem_id="preview", height=240)
                question = gr.Textbox(label="question", placeholder=what, elem_id="question",
                                      interactive=demo.kind == "lvlm")
                method = gr.Dropdown(demo.methods, value=DEFAULT_METHOD if DEFAULT_METHOD in demo.methods
                                     else demo.methods[0], label="method", elem_id="method")
                keep = gr.Textbox(value=str(DEFAULT_BUDGET), label="budget: a share in (0, 1] or a token count",
                                  elem_id="budget")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                overlays = gr.Image(label="kept patches per stage", elem_id="overlays", interactive=False)
                table = gr.Dataframe(headers=HEADERS, label="unpruned vs pruned", elem_id="comparison",
                                     interactive=False, wrap=True)
                status = gr.Markdown(elem_id="status")
        gr.Examples(examples(demo.kind), inputs=[image, question], label="examples")
        image.change(lambda path: show(path), image, [preview, status])
        run.click(lambda *args: answer(demo, *args), [image, question, method, keep], [overlays, table, status],
                  concurrency_limit=4)
    return app


def launch(model: str = "tiny-llava-evqa", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True):
    """Loads `model` once and serves the page; block=False returns the running app (tests)."""
    app = build(DemoModel.load(model))
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return app
