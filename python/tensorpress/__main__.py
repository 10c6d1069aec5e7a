import sys

from tensorpress.cli import main

sys.exit(main())
