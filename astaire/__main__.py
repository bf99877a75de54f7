import sys

from astaire.cli import main

sys.exit(main())
