"""localcloud: a test double of the cloud that speaks Google's and OpenAI's wire protocols.

agentd's production clients run against it unchanged: one grpc.aio server
hosts `google.cloud.speech.v1.Speech` (StreamingRecognize, Recognize) and
`google.cloud.texttospeech.v1.TextToSpeech` (SynthesizeSpeech,
StreamingSynthesize, ListVoices); an h11 server answers OpenAI's
`/v1/chat/completions` and `/v1/models`. The engines are real: pocketsphinx
(or a deterministic script) for STT, espeak-ng for TTS, keyword rules for chat.

Why asyncio, in a Trio project: localcloud is not agentd and not on its hot
path. It is a separate tool whose main component, the grpc.aio server, is
asyncio-native (grpcio has no Trio server), so it runs on its own asyncio
loop in its own thread and shares nothing with the Trio code that tests it.

Modules: `settings` (knobs, faults, counters), `segmenter` + `stt_engines`
(recognition), `speech_service`, `espeak` + `tts_service`, `chat` +
`http_server`, `server` (`LocalCloud`), `cli` (`main`).
"""

from agentd.testbed.localcloud.cli import main
from agentd.testbed.localcloud.server import LocalCloud
from agentd.testbed.localcloud.settings import Faults, LocalCloudSettings, read_script, settings_from_config

__all__ = ["Faults", "LocalCloud", "LocalCloudSettings", "main", "read_script", "settings_from_config"]
