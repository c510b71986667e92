import sys

from xswinir.cli import main

sys.exit(main())
