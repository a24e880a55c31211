"""The SIP gateway: phone calls (SIP over UDP/TCP, G.711 RTP, RFC 4733 DTMF) bridged to the
edge's Converse stream, one stream per call. Run it with `voicestack serve sip` (settings:
config.Settings' sip_* fields); gateway.py says what each part does and which libraries do
the work."""
