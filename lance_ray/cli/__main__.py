from lance_ray.cli import main

raise SystemExit(main())
