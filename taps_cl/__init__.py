"""taps-cl: continual multi-task learning on one frozen backbone."""

__version__ = "0.1.0"
