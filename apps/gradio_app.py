"""The Gradio app from a checkout: ``python -m apps.gradio_app`` (the installed command is ``sbora-app``).

The app itself is ``sbora_diffusion/app.py``; this launcher keeps the earlier command working.
"""

from sbora_diffusion.app import main

if __name__ == "__main__":
    raise SystemExit(main())
