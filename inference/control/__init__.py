"""The rescue policy at inference: triggers, the controller that acts on them, arithmetic steps."""
