import sys

from dacnn.cli import main

sys.exit(main())
