"""What a run measures about itself: model FLOPs and MFU, and the report written at the end."""
