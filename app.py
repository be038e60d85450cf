"""align-workbench: `python app.py` serves the UI on 127.0.0.1:7860 (GRADIO_SERVER_NAME/PORT override).

Also the app file of the Hugging Face Space.
"""

from workbench.ui.app import build_app, launch

demo = build_app()

if __name__ == "__main__":
    launch(demo)
