"""The MQTT mapping of the link protocol (codec_spec/PROTOCOL.md 11): topic names and the payload of an MQTT
message. Device and host both use it (one implementation of each rule).

Topics, under the address's prefix (``mqtt://HOST:PORT/PREFIX``):

- ``PREFIX/DEVICE/data``: device -> workers, QoS 1, never retained; workers share ``$share/GROUP/PREFIX/+/data``.
- ``PREFIX/DEVICE/result``: worker -> device, QoS 1, never retained.

Every payload is the device's 16-byte session id followed by exactly one message with the envelope of PROTOCOL.md
2 (nothing else, as a datagram holds one: 10.1). The session id is the nonce of PROTOCOL.md 8: the tag of an
authenticated message is HMAC-SHA256(device key, session id || message)[0:16], so any worker holding the device's
key verifies any message without a handshake, and a message tagged for one session verifies in no other.

MicroPython-compatible Python 3.7.
"""

from .auth import Auth
from .protocol import pack_message, parse_datagram

SESSION_SIZE = 16  # bytes of the session id that starts every payload
DATA_LEVEL = "data"
RESULT_LEVEL = "result"
_TOPIC_SPECIAL = "/+#"  # a device name is one topic level: none of these


def new_session_id():
    """16 random bytes naming one run of a device (its messages' nonce)."""
    try:
        import os
        return bytes(os.urandom(SESSION_SIZE))
    except (ImportError, AttributeError, NotImplementedError):
        import random
        return bytes([random.getrandbits(8) for _ in range(SESSION_SIZE)])


def valid_device(name):
    """Whether ``name`` can name a device on MQTT: 1-64 printable ASCII characters (PROTOCOL.md 5.1) that are not
    a topic separator or wildcard (``/``, ``+``, ``#``)."""
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        return False
    for ch in name:
        if not 32 < ord(ch) < 127 or ch in _TOPIC_SPECIAL:
            return False
    return True


def data_topic(prefix, device):
    return prefix + "/" + device + "/" + DATA_LEVEL


def result_topic(prefix, device):
    return prefix + "/" + device + "/" + RESULT_LEVEL


def shared_data_filter(group, prefix):
    """The topic filter a pool of workers shares: each message goes to one worker of ``group``."""
    return "$share/" + group + "/" + prefix + "/+/" + DATA_LEVEL


def device_of(topic, prefix, level=DATA_LEVEL):
    """The device a ``PREFIX/DEVICE/level`` topic names, or None when it is not one (or names no valid device)."""
    head = prefix + "/"
    tail = "/" + level
    if not topic.startswith(head) or not topic.endswith(tail):
        return None
    name = topic[len(head):len(topic) - len(tail)]
    return name if valid_device(name) else None


def session_auth(key, session):
    """The Auth of a session: a device key (or None: no authentication) and the session id as the nonce."""
    return Auth(key, session) if key is not None else None


def pack(session, mtype, seq, body=b"", auth=None):
    """One MQTT payload: ``session`` (16 bytes) and one message (tagged with ``auth``)."""
    return bytes(session) + pack_message(mtype, seq, body, auth)


def unpack(payload, auth=None, max_message=1 << 20):
    """(session, event) of a payload: ``event`` is what ``lwfc.protocol.parse_datagram`` reports for the message
    after the session id (a Message, a ``(CORRUPT | BAD_AUTH, type, seq, length)`` tuple, or None when it is not
    exactly one message). ``session`` is None when the payload is too short to hold one."""
    if len(payload) < SESSION_SIZE:
        return None, None
    session = bytes(payload[:SESSION_SIZE])
    return session, parse_datagram(memoryview(payload)[SESSION_SIZE:], auth, max_message)
