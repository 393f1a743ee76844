"""`python -m tesela.server`: run the OpenAI-compatible server (the same as `tesela serve`)."""

import sys

from tesela.server.app import main

sys.exit(main())
