"""The host server: devices connect, frames are decoded, the cloud half answers."""
