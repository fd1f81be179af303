import sys

from proxy_agent.cli import main

sys.exit(main())
