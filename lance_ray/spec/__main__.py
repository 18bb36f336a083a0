from lance_ray.spec import main

raise SystemExit(main())
