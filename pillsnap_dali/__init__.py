"""pillsnap_dali: DALI input pipelines and training for pill recognition on the AI Hub oral-drug images."""
import logging

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())
