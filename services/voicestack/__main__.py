import sys

from voicestack.cli import main

sys.exit(main())
