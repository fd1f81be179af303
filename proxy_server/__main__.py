import sys

from proxy_server.cli import main

sys.exit(main())
