"""SDP offer/answer (RFC 3264) for one audio stream: G.711 PCMU (0) or PCMA (8) at 8 kHz,
20 ms packets, and telephone-event (RFC 4733) when the offer has it. Parsing and writing are
sdp-transform's; this module only chooses."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sdp_transform

# Static payload types we speak, by name (RFC 3551).
CODECS = {0: "PCMU", 8: "PCMA"}
PTIME_MS = 20


class SdpError(ValueError):
    """The offer cannot be answered: the SIP status to refuse with, and why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass
class Offer:
    remote_host: str
    remote_port: int
    payload_type: int  # the codec chosen: 0 or 8
    codec: str
    dtmf_payload_type: int | None  # telephone-event/8000 in the offer, if any
    direction: str  # sendrecv, sendonly, recvonly, inactive (as the caller sees it)


def parse_offer(body: bytes) -> Offer:
    """The first audio stream of the offer and the codec we answer with (the caller's
    preference among PCMU and PCMA). SdpError(400) for malformed SDP, 488 when nothing
    in it can be answered."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError(400, "SDP is not UTF-8") from None
    if not text.strip().startswith("v=0"):
        raise SdpError(400, "SDP must start with v=0")
    try:
        session = sdp_transform.parse(text)
    except Exception as error:  # noqa: BLE001 - the parser raises anything on garbage
        raise SdpError(400, f"malformed SDP: {error}") from None
    audio = [m for m in session.get("media", []) if m.get("type") == "audio"]
    if not audio:
        raise SdpError(488, "no audio stream offered")
    media = audio[0]
    if not media.get("port"):
        raise SdpError(488, "the audio stream is disabled (port 0)")
    if "RTP/AVP" not in str(media.get("protocol", "")) or "SAVP" in str(media.get("protocol", "")):
        raise SdpError(488, f"transport {media.get('protocol')} is not supported (RTP/AVP only)")
    connection = media.get("connection") or session.get("connection")
    if not connection or not connection.get("ip"):
        raise SdpError(400, "no c= line for the audio stream")
    if connection.get("version", 4) != 4:
        raise SdpError(488, "only IPv4 media addresses are supported")
    try:
        offered = [int(pt) for pt in str(media.get("payloads", "")).split()]
    except ValueError:
        raise SdpError(400, "malformed payload types in m=audio") from None
    names = {r["payload"]: (str(r.get("codec", "")).upper(), r.get("rate")) for r in media.get("rtp", [])}
    chosen = None
    for pt in offered:
        name, rate = names.get(pt, (CODECS.get(pt, ""), 8000))
        if name in ("PCMU", "PCMA") and rate in (8000, None):
            chosen = (pt, name)
            break
    if chosen is None:
        raise SdpError(488, "no common codec: PCMU/8000 or PCMA/8000 wanted")
    dtmf = next((pt for pt in offered if names.get(pt, ("", 0))[0] == "TELEPHONE-EVENT"
                 and names[pt][1] == 8000), None)
    direction = str(media.get("direction") or session.get("direction") or "sendrecv")
    return Offer(remote_host=connection["ip"], remote_port=int(media["port"]), payload_type=chosen[0],
                 codec=chosen[1], dtmf_payload_type=dtmf, direction=direction)


_ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


def build_answer(offer: Offer, local_host: str, local_port: int, session_id: int, version: int = 1) -> bytes:
    payloads = [offer.payload_type] + ([offer.dtmf_payload_type] if offer.dtmf_payload_type is not None else [])
    rtp = [{"payload": offer.payload_type, "codec": offer.codec, "rate": 8000}]
    fmtp = []
    if offer.dtmf_payload_type is not None:
        rtp.append({"payload": offer.dtmf_payload_type, "codec": "telephone-event", "rate": 8000})
        fmtp.append({"payload": offer.dtmf_payload_type, "config": "0-16"})
    answer = {
        "version": 0,
        "origin": {"username": "voicestack", "sessionId": session_id, "sessionVersion": version,
                   "netType": "IN", "ipVer": 4, "address": local_host},
        "name": "voicestack",
        "connection": {"version": 4, "ip": local_host},
        "timing": {"start": 0, "stop": 0},
        "media": [{"type": "audio", "port": local_port, "protocol": "RTP/AVP",
                   "payloads": " ".join(str(p) for p in payloads), "rtp": rtp, "fmtp": fmtp,
                   "ptime": PTIME_MS, "direction": _ANSWER_DIRECTION.get(offer.direction, "sendrecv")}],
    }
    return sdp_transform.write(answer).encode()


def new_session_id() -> int:
    return int(time.time() * 1000) & 0x7FFFFFFF
