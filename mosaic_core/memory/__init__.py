"""The torch layer: KV layout, the device/host/disk tiers and the transfers between them."""
