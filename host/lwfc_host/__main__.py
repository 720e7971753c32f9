import sys

from lwfc_host.cli import main

sys.exit(main())
