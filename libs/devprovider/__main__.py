import sys

from libs.devprovider.cli import main

sys.exit(main())
