"""The engine's models, one file each, on the shared base (base.py: config + safetensors + preprocessing per
checkpoint folder): ctvit.py (CT-ViT), ctclip.py (CT CLIP), text.py (the pluggable text tower), losses.py."""
