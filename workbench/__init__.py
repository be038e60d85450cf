"""align-workbench: an interactive workbench for making text-to-image models follow their prompts."""

__version__ = "0.1.0"
