import sys

from h2t.cli import main

sys.exit(main())
